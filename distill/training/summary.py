"""What a `distill fit` run ends with: a few lines on stdout (rank 0), after Lightning's "`max_epochs=N` reached".

    fit done: 5 epochs (15 steps), best at epoch 4
    metric                 best   final  validation top-1 % of
    ---------------------  -----  -----  -------------------------------------------------------
    val/acc                62.00  60.00  the student, its two heads averaged (what export serves)
    ...
    checkpoints: runs/distill/checkpoints/best.ckpt (best), runs/distill/checkpoints/last.ckpt (final)
    next: distill export --ckpt runs/distill/checkpoints/best.ckpt --out exports/student

`ValidationHistory` keeps each validation's figures, also in the checkpoints (a resumed run knows its earlier
epochs); `run_summary` writes the lines from given figures; `fit_summary` gathers them from a finished trainer.
No validation is run for it: the best epoch's figures are those recorded when best.ckpt was written.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl

from distill.common.tables import format_rows

__all__ = ["FitClock", "ValidationHistory", "ValidationRecord", "fit_summary", "next_command", "run_summary"]

# the summary's rows, in this order, each where the run logged it; acc_cls / acc_dist for a student with two heads
ROWS = (("val/acc", "the trained model"), ("val/acc_cls", "its class head"), ("val/acc_dist", "its distillation head"),
        ("val_ema/acc", "the EMA of the student's weights"), ("val/teacher_acc", "the teacher, on the same images"),
        ("val/teacher_agreement", "images where student and teacher agree (top-1)"))
CHECKPOINT_KEY = "validation_history"  # beside the state dict in every checkpoint
WALL_KEY = "fit_wall_time_s"  # the fit's seconds so far, beside it


@dataclass
class ValidationRecord:
    """One validation during fit: its epoch (0-based, as Lightning counts), global step and `val/` figures."""

    epoch: int
    step: int
    metrics: dict[str, float]


class FitClock(pl.Callback):
    """The fit's wall time over every process that trained it: a resumed run starts from the seconds its checkpoint
    recorded, so a result's `wall_time_s` is the whole run's, not its last process's (compare's `wall s/run`)."""

    def __init__(self) -> None:
        self.before, self.started = 0.0, time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[WALL_KEY] = self.seconds()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":  # not the best checkpoint validated after the fit
            self.before = float(checkpoint.get(WALL_KEY, 0.0))


class ValidationHistory(pl.Callback):
    """The `val/` and `val_ema/` figures of each validation during fit (not the sanity check, not a `validate`
    afterwards), written into every checkpoint and read back when a fit resumes one."""

    def __init__(self) -> None:
        self.records: list[ValidationRecord] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the checkpoint callback's own on_validation_end (Lightning runs checkpoint callbacks last), so the
        # checkpoint written now holds this validation too
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ema/"))}
        self.records.append(ValidationRecord(trainer.current_epoch, trainer.global_step, metrics))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = [asdict(record) for record in self.records]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":  # not the best checkpoint that `metrics_json` validates after the fit
            self.records = [ValidationRecord(**record) for record in checkpoint.get(CHECKPOINT_KEY, [])]


def run_summary(best: Optional[ValidationRecord], final: Optional[ValidationRecord], epochs: int, steps: int,
                two_heads: bool, checkpoints: dict[str, str], next_step: Optional[str]) -> str:
    """The end-of-fit lines: validation top-1 (%) at the best validation (what best.ckpt holds) and the final one,
    per head when the student has two, the teacher's and the agreement where logged; the checkpoint files
    (`{"best": path, "last": path}`, either may be missing) and the command to run next."""
    at_best = f", best at epoch {best.epoch + 1}" if best is not None else ""
    lines = [f"fit done: {epochs} epoch{'s' * (epochs != 1)} ({steps} steps){at_best}"]
    rows = []
    for name, what in ROWS:
        if final is None or name not in final.metrics or (name in ("val/acc_cls", "val/acc_dist") and not two_heads):
            continue
        if name == "val/acc" and two_heads:
            what = "the student, its two heads averaged (what export serves)"
        value = best.metrics.get(name) if best is not None else None
        rows.append((name, "-" if value is None else f"{100 * value:.2f}", f"{100 * final.metrics[name]:.2f}", what))
    if rows:
        lines.append(format_rows(("metric", "at best", "final", "validation top-1 % of"), rows))
    else:
        lines.append("no validation ran (trainer.limit_val_batches 0?): no figures to show")
    named = [f"{path} ({'best' if kind == 'best' else 'final'})" for kind, path in checkpoints.items() if path]
    if named:
        lines.append(f"checkpoints: {', '.join(named)}")
    if next_step:
        lines.append(f"next: {next_step}")
    return "\n".join(lines)


def next_command(checkpoint: str, teacher_run: bool, model_name: Optional[str], dataset: Optional[str]) -> str:
    """The command to run with a fit's checkpoint: distil a student from it (a teacher's run: no teacher, one head),
    or export it."""
    if teacher_run:
        recipe = Path("configs/distill.yaml")  # as the docs write it; from another folder, the project's own
        shipped = Path(__file__).resolve().parents[2] / recipe
        command = ["distill", "fit", "--config", str(recipe if recipe.is_file() or not shipped.is_file() else shipped)]
        command += ["--model.teacher.init_args.model_name", model_name] if model_name else []
        command += ["--model.teacher.init_args.weights", checkpoint]
        command += ["--data.dataset", dataset] if dataset else []
    else:
        command = ["distill", "export", "--ckpt", checkpoint, "--out", "exports/student"]
    return shlex.join(command)


def fit_summary(trainer: pl.Trainer, next_step: bool = True) -> str:
    """`run_summary` of a finished fit: the records of its `ValidationHistory`, its checkpoint callback's files; the
    next command unless `next_step` is False (a pipeline or compare runs what comes next itself)."""
    history = next((c for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
    records = history.records if history is not None else []
    final = records[-1] if records else None
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None)
    monitor = getattr(callback, "monitor", None)
    # the first validation with the callback's best score (it keeps the first of equal ones); none when it came
    # before a resume from a checkpoint without history
    best = next((r for r in records if score is not None and r.metrics.get(monitor) == float(score)), None)
    paths = {"best": getattr(callback, "best_model_path", ""), "last": getattr(callback, "last_model_path", "")}
    paths = {kind: _shown(path) for kind, path in paths.items() if path}
    module = trainer.lightning_module
    two_heads = final is not None and "val/head_cosine" in final.metrics  # logged only when the heads differ
    teacher_run = not module.loss.needs_teacher and not two_heads
    model_name = dict(getattr(module.student, "config", {})).get("model_name")
    step = next_command(paths.get("best") or paths.get("last", "<checkpoint>"), teacher_run, model_name,
                        getattr(trainer.datamodule, "dataset", None))
    return run_summary(best, final, trainer.current_epoch, trainer.global_step, two_heads, paths,
                       step if next_step else None)


def _shown(path: str) -> str:
    """A checkpoint path as a user types it: relative to the current folder when it lies below it."""
    if "://" in path:
        return path
    absolute = Path(path).absolute()
    return os.path.relpath(absolute) if Path.cwd() in absolute.parents else str(absolute)
