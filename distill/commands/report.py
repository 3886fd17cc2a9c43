"""`distill report RUN_DIR [--plot FOLDER]`: the summary of a run (or of every stage of a pipeline)
read back from its TensorBoard event files.

    distill report runs/distill                 # one row per TensorBoard run found below the folder
    distill report runs/digits --plot plots/    # a pipeline: one row per stage, PNG curves per stage

Columns: best and final validation accuracy of the averaged head, final accuracy of the class
and distillation heads, the EMA's best when there is one, the teacher's accuracy and the
student-teacher agreement, epochs and wall time (first to last event).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill.common.commandline import command
from distill.common.errors import UserError
from distill.common.files import folder_for_outputs, write_atomically, writing
from distill.common.tables import format_rows

__all__ = ["read_runs", "summarize", "plot_names", "main"]

EVENTS = "events.out.tfevents.*"


def read_runs(root: str | Path) -> dict[str, dict[str, list[tuple[float, int, float]]]]:
    """{label: {tag: [(wall_time, step, value), ...]}} for every folder below `root` with event files, oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"report: '{root}' is not a folder")
    folders = sorted({path.parent for path in root.rglob(EVENTS)})
    if not folders:
        raise UserError(f"report: no TensorBoard event files ({EVENTS}) below '{root}'")
    runs = {}
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        label = str(folder.relative_to(root)) if folder != root else folder.name
        runs[label] = {tag: [(e.wall_time, e.step, e.value) for e in events.Scalars(tag)]
                       for tag in events.Tags()["scalars"]}
    # in the order the runs were made (a pipeline's stages in their order), then by name
    started = {label: min((t for series in scalars.values() for t, _, _ in series), default=0.0)
               for label, scalars in runs.items()}
    return dict(sorted(runs.items(), key=lambda item: (started[item[0]], item[0])))


def summarize(scalars: dict[str, list[tuple[float, int, float]]]) -> dict[str, Any]:
    """Best/final metrics of one run."""
    def values(tag: str) -> list[float]:
        return [v for _, _, v in scalars.get(tag, []) if not math.isnan(v)]

    def best(tag: str) -> Optional[float]:
        return max(values(tag), default=None)

    def final(tag: str) -> Optional[float]:
        found = values(tag)
        return found[-1] if found else None

    times = [t for series in scalars.values() for t, _, _ in series]
    return {
        "best_acc": best("val/acc"), "final_acc": final("val/acc"), "final_acc_cls": final("val/acc_cls"),
        "final_acc_dist": final("val/acc_dist"), "best_ema_acc": best("val_ema/acc"),
        "teacher_acc": final("val/teacher_acc"), "agreement": final("val/teacher_agreement"),
        "epochs": len(scalars.get("train/epoch_time_s", [])) or None,
        "wall_s": (max(times) - min(times)) if times else None,
    }


COLUMNS = (("run", None), ("best acc", "best_acc"), ("final acc", "final_acc"), ("cls", "final_acc_cls"),
           ("dist", "final_acc_dist"), ("ema best", "best_ema_acc"), ("teacher", "teacher_acc"),
           ("agreement", "agreement"), ("epochs", "epochs"), ("wall_s", "wall_s"))


def _cell(key: Optional[str], value: Any) -> str:
    if value is None:
        return "-"
    if key in ("epochs",):
        return str(int(value))
    if key == "wall_s":
        return f"{value:.0f}"
    return f"{100 * value:.2f}"


def report(root: str | Path) -> str:
    runs = read_runs(root)
    rows = []
    for label, scalars in runs.items():
        summary = summarize(scalars)
        rows.append((label, *(_cell(key, summary[key]) for _, key in COLUMNS[1:])))
    header = tuple(name for name, _ in COLUMNS)
    text = format_rows(header, rows) + "\n(validation top-1 in %; cls/dist: the final epoch's class and distillation heads)"
    empty = [label for label, scalars in runs.items() if not scalars.get("val/acc")]
    if empty:  # a row of dashes alone would not say why
        text += (f"\nno validation figures in: {', '.join(empty)} (not validated yet, or its event files are "
                 "damaged or cut short)")
    return text


def plot_runs(root: str | Path, out: str | Path, overwrite: bool = False) -> list[Path]:
    """One PNG per run (named by `plot_names`): validation accuracy per head (and EMA, teacher agreement); training
    loss parts.

    An existing PNG of the same name (an earlier call's plot) is replaced only with `overwrite`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(root)
    with folder_for_outputs(out, "report --plot") as out:
        return _plot(runs, out, overwrite, plt)


def _plot(runs: dict, out: Path, overwrite: bool, plt: Any) -> list[Path]:
    targets = {label: out / name for label, name in plot_names(list(runs)).items()}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise UserError(f"report --plot: {existing[0]} exists{f' (and {len(existing) - 1} more)' if existing[1:] else ''}; "
                        "pass --overwrite to replace, or choose another --plot folder")
    written = []
    for label, scalars in runs.items():
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for tag in ("val/acc", "val/acc_cls", "val/acc_dist", "val_ema/acc", "val/teacher_agreement"):
            if scalars.get(tag):
                left.plot([s for _, s, _ in scalars[tag]], [v for _, _, v in scalars[tag]], label=tag)
        left.set_xlabel("step")
        left.set_title("validation")
        left.legend(fontsize=8)
        total = [v for _, _, v in scalars.get("train/loss", [])]
        parts = sorted(tag for tag in scalars if tag.startswith("train/loss_"))  # whatever terms the method has
        for tag in ("train/loss", *parts):
            values = [v for _, _, v in scalars.get(tag, [])]
            # a part equal to the total is not drawn again (older runs without a teacher logged loss_base and
            # loss_distill, the total's repeats for a student with one head)
            if values and (tag == "train/loss" or not _same_curve(values, total)):
                right.plot([s for _, s, _ in scalars[tag]], [v for _, _, v in scalars[tag]], label=tag)
        right.set_xlabel("step")
        right.set_title("training loss")
        right.legend(fontsize=8)
        figure.suptitle(label)
        figure.tight_layout()
        path = targets[label]
        with writing(path, "report --plot"), write_atomically(path, ".partial.png") as partial:
            figure.savefig(partial, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _same_curve(values: list[float], others: list[float]) -> bool:
    return len(values) == len(others) and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(values, others))


def plot_names(labels: list[str]) -> dict[str, str]:
    """A PNG file name per run label, one file per run: the label with '/' as '_' (`teacher/version_0` ->
    `teacher_version_0.png`); where that is not unique (`teacher_version_0` is a run too) or the label holds a '%',
    the label URL-encoded instead (`teacher%2Fversion_0.png`), which never equals another label's name."""
    flat = {label: label.replace("/", "_") for label in labels}
    clashes = Counter(flat.values())
    return {label: (name if clashes[name] == 1 and "%" not in label else quote(label, safe="")) + ".png"
            for label, name in flat.items()}


def report_command(run_dir: str, plot: Optional[str] = None, overwrite: bool = False) -> None:
    """Print a run's (or a pipeline's) figures; with `plot`, also write one PNG of curves per run.

    Args:
        run_dir: a run's folder, a logger folder (runs/distill) or a pipeline's (runs/digits)
        plot: also write one PNG of curves per run into this folder
        overwrite: replace PNGs of the same names in --plot
    """
    print(report(run_dir))
    if plot:
        for path in plot_runs(run_dir, plot, overwrite):
            print(f"wrote {path}")


main = command("distill report", report_command, positional=True, description=__doc__.split("\n\n")[0])
