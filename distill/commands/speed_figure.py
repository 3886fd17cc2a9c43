"""DeiT's Figure 1 for a comparison: validation top-1 against inference throughput, students and teachers.

`distill compare ... --plot` measures the throughput of the comparison's student and teacher(s) with ONNX Runtime
on this machine (distill/deploy/throughput.py) and draws, for batch 1 and batch 64, each distillation type's student
(final-epoch top-1, mean and standard deviation over the seeds) and each teacher (its top-1 on the same split).
"""
from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path
from typing import Any, Optional

from distill.common.errors import UserError
from distill.common.files import write_atomically
from distill.common.tables import format_rows
from distill.deploy.inference import load_student
from distill.deploy.throughput import Member, architecture, measure_throughput

__all__ = ["comparison_models", "measure_comparison", "speed_table", "draw", "teacher_configs"]

BATCHES = (1, 64)


def comparison_models(checkpoint: str | Path) -> dict[str, list[Member]]:
    """The student of a run's checkpoint (its heads averaged, as exported) and its teacher: with several members,
    each alone (`teacher 0`, ...) and the ensemble (`teacher`); {name: [(module, image size), ...]}."""
    student, saved = load_student(checkpoint, option="compare --plot")
    size = int(saved.get("hyper_parameters", {}).get("img_size", 224))
    models = {"student": [(student.fused_model(), size)]}
    teachers = teacher_configs(saved.get("teacher_config"))
    members = [(_teacher_model(t, int(student.num_classes)), int(t.get("img_size") or size)) for t in teachers]
    if len(members) > 1:
        models.update({f"teacher {index}": [member] for index, member in enumerate(members)})
    if members:
        models["teacher"] = members
    return models


def _teacher_model(config: dict[str, Any], classes: int) -> Any:
    """The teacher as the run built it (a ViT trained here has its run's sizes); its timm architecture when its
    weights are not where the run read them (speed does not depend on the weights)."""
    from teachers import Teacher

    try:
        return Teacher(**{k: v for k, v in config.items() if k in inspect.signature(Teacher).parameters}).model
    except UserError:
        return architecture(config["model_name"], classes)


def teacher_configs(recorded: Any) -> list[dict[str, Any]]:
    """The teacher members a checkpoint records: none, one teacher's config, or an ensemble's `members`."""
    if not recorded:
        return []
    if isinstance(recorded, dict) and "members" in recorded:
        return list(recorded["members"])
    return list(recorded) if isinstance(recorded, list) else [recorded]


def measure_comparison(runs: list[dict[str, Any]], threads: int) -> Optional[dict[str, Any]]:
    """The throughput of the comparison's student and teachers (from the first finished run that had a teacher, so
    that `none` alone still gives the student), with the load of the machine when it was measured."""
    done = [run for run in runs if run.get("result")]
    with_teacher = [run for run in done if run.get("needs_teacher", run["type"] != "none")] or done
    if not with_teacher:
        return None
    checkpoint = with_teacher[0]["folder"] / "checkpoints" / "best.ckpt"
    load_before = os.getloadavg()[0]
    speed = measure_throughput(comparison_models(checkpoint), BATCHES, threads=threads)
    return {"images_per_s": {name: {str(b): v for b, v in by_batch.items()} for name, by_batch in speed.items()},
            "threads": threads, "backend": "onnxruntime CPU, fp32", "from": str(checkpoint),
            "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _points(summary: dict[str, Any], speed: dict[str, Any], batch: int) -> list[tuple[str, float, float, float]]:
    """(label, images/s, top-1 %, its standard deviation) of every student type and teacher that has both: the final
    epoch's on the validation split, or on the held-out folder where the comparison measured one (`--test`)."""
    per_s = speed["images_per_s"]
    held = summary.get("held_out")
    points = []
    for kind, row in summary["types"].items():
        top1 = row["held_out"] if held else row["final"]
        if top1["mean"] is not None and "student" in per_s:
            points.append((f"student ({kind})", per_s["student"][str(batch)], 100 * top1["mean"], 100 * top1["std"]))
    teacher, members = (held["teacher_acc"], held["teacher_members"]) if held else (
        summary.get("teacher_acc"), summary.get("teacher_members") or [])
    if teacher is not None and "teacher" in per_s:
        label = f"teacher (ensemble of {len(members)})" if members else "teacher"
        points.append((label, per_s["teacher"][str(batch)], 100 * teacher, 0.0))
    for index, accuracy in enumerate(members):
        if f"teacher {index}" in per_s:
            points.append((f"teacher {index}", per_s[f"teacher {index}"][str(batch)], 100 * accuracy, 0.0))
    return points


def speed_table(summary: dict[str, Any], speed: dict[str, Any]) -> str:
    """The figure's points as a table: top-1 and images/s at each batch size."""
    rows: dict[str, list[str]] = {}
    for batch in BATCHES:
        for label, per_s, top1, std in _points(summary, speed, batch):
            rows.setdefault(label, [label, f"{top1:.2f}" + (f" +- {std:.2f}" if std else "")]).append(f"{per_s:.0f}")
    header = ("model", "top-1 (final)" if not summary.get("held_out") else "top-1 (held-out)",
              *(f"images/s, batch {b}" for b in BATCHES))
    return format_rows(header, list(rows.values()))


def draw(summary: dict[str, Any], speed: dict[str, Any], path: Path, title: str) -> Path:
    """The PNG: one panel per batch size, throughput (log scale) on x, top-1 on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, len(BATCHES), figsize=(5.5 * len(BATCHES), 4.2), squeeze=False)
    for axis, batch in zip(axes[0], BATCHES):
        placed: list[tuple[float, float]] = []
        points = _points(summary, speed, batch)
        tops = [top1 for _, _, top1, _ in points]
        near = 0.04 * ((max(tops) - min(tops)) if len(tops) > 1 and max(tops) > min(tops) else 1.0)
        for label, per_s, top1, std in points:
            student = label.startswith("student")
            axis.errorbar([per_s], [top1], yerr=[std] if std else None, fmt="o" if student else "s",
                          color="tab:red" if student else "tab:blue", capsize=3)
            # a point on another's spot (the students share their speed, and may tie): its label goes lower
            below = sum(1 for x, y in placed if abs(x / per_s - 1) < 0.05 and abs(y - top1) < near)
            placed.append((per_s, top1))
            axis.annotate(label, (per_s, top1), textcoords="offset points", xytext=(6, 4 - 11 * below), fontsize=8)
        axis.set_xscale("log")
        # 1000, 2000, 3000, 5000 as numbers: a log axis spanning less than a decade labels its minor ticks as 3x10^3
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        axis.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:.0f}"))
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.margins(x=0.3, y=0.15)  # room for the labels
        axis.set_xlabel(f"images/s, batch {batch} (ONNX Runtime, {speed['threads']} thread(s), this CPU)")
        axis.set_ylabel(f"{'held-out' if summary.get('held_out') else 'validation'} top-1 (%), final epoch")
        axis.grid(alpha=0.3)
    figure.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    figure.tight_layout()
    with write_atomically(path) as partial:
        figure.savefig(partial, format="png", dpi=110)
    plt.close(figure)
    return path
