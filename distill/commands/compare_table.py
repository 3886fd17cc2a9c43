"""`distill compare`'s table: per arm, mean and spread over seeds of the final and best epochs' top-1, each head, the
gap to the teacher and the gain over the arm without one; and, measured on a held-out folder (`--test`), the final
checkpoints' and the teachers' top-1 there."""
from __future__ import annotations

import statistics
from typing import Any, Optional

from distill.common.tables import format_rows

__all__ = ["format_table", "summarize_runs"]


def summarize_runs(runs: list[dict[str, Any]], types: list[str]) -> dict[str, Any]:
    """Per type: final and best top-1 over the seeds (mean, std), wall time; the teacher; gaps and gains; and where
    the runs were measured on a held-out folder (run["held_out"]), the final checkpoints' and the teachers' there."""
    rows: dict[str, dict[str, Any]] = {}
    for kind in types:
        results = [run["result"] for run in runs if run["type"] == kind and run.get("result")]
        def final(name: str) -> list[float]:
            return [r["final_metrics"][name] for r in results if name in r.get("final_metrics", {})]

        best = [r["metrics"]["val/acc"] for r in results if "val/acc" in r.get("metrics", {})]
        held_out = [run["held_out"]["val/acc"] for run in runs if run["type"] == kind and "val/acc" in run.get(
            "held_out", {})]
        # DeiT's Table 3: the class head alone, the distillation head alone, and their average (val/acc)
        rows[kind] = {"runs": len(results), "final": _stats(final("val/acc")), "best": _stats(best),
                      "final_cls": _stats(final("val/acc_cls")), "final_dist": _stats(final("val/acc_dist")),
                      "held_out": _stats(held_out),
                      "wall_s": statistics.fmean([r["wall_time_s"] for r in results]) if results else None,
                      "seeds": [run["seed"] for run in runs if run["type"] == kind and run.get("result")]}
    teacher_acc, members = _teachers([run["result"].get("metrics", {}) for run in runs if run.get("result")])
    held_teacher, held_members = _teachers([run["held_out"] for run in runs if run.get("held_out")])
    baseline = _baseline(runs, types)
    none = rows.get(baseline, {}).get("final", {}).get("mean")
    for row in rows.values():
        mean = row["final"]["mean"]
        row["gap_to_teacher"] = teacher_acc - mean if teacher_acc is not None and mean is not None else None
        row["gain_over_none"] = mean - none if none is not None and mean is not None else None
    held = any(run.get("held_out") for run in runs)
    return {"teacher_acc": teacher_acc, "types": rows, "baseline": baseline, "teacher_members": members,
            "held_out": {"teacher_acc": held_teacher, "teacher_members": held_members} if held else None}


def _teachers(metrics: list[dict[str, float]]) -> tuple[Optional[float], list[float]]:
    """The teacher's top-1 (val/teacher_acc) and an ensemble's members' (val/teacher_acc_<i>), each the mean over the
    runs that measured it (the same frozen teacher: the same figure, up to a run's precision)."""
    teacher = [m["val/teacher_acc"] for m in metrics if "val/teacher_acc" in m]
    members: dict[int, list[float]] = {}
    for m in metrics:
        for name, value in m.items():
            if name.startswith("val/teacher_acc_"):
                members.setdefault(int(name.rsplit("_", 1)[1]), []).append(value)
    return (statistics.fmean(teacher) if teacher else None), [statistics.fmean(members[i]) for i in sorted(members)]


def _baseline(runs: list[dict[str, Any]], types: list[str]) -> str:
    """The arm the gains are measured from: `none`, else the first arm that runs no teacher (a file's: the student
    alone at its own augmentation), else `none` (absent: no gain column)."""
    alone = [kind for kind in types if any(run["type"] == kind and not run.get("needs_teacher", True) for run in runs)]
    return "none" if "none" in types or not alone else alone[0]


def _stats(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def format_table(summary: dict[str, Any]) -> str:
    """The comparison as a text table (top-1 in %, mean +- std over seeds, the value alone for one seed; the averaged
    head's, then each head's alone at the final epoch: equal for a student with one head)."""
    def pm(stats: dict[str, Any]) -> str:
        if stats["mean"] is None:
            return "-"
        spread = f" +- {100 * stats['std']:.2f}" if len(stats["values"]) > 1 else ""  # one seed has no spread
        return f"{100 * stats['mean']:.2f}{spread}"

    def signed(value: Optional[float]) -> str:
        return "-" if value is None else f"{round(100 * value, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"

    held = summary.get("held_out")
    header = ("distillation", "seeds", "final top-1", "best-epoch top-1", *(["held-out top-1"] if held else []),
              "class head", "dist. head", "gap to teacher", f"gain over {summary.get('baseline', 'none')}", "wall s/run")
    rows = [(kind, str(row["runs"]), pm(row["final"]), pm(row["best"]), *([pm(row["held_out"])] if held else []),
             pm(row["final_cls"]), pm(row["final_dist"]), signed(row["gap_to_teacher"]), signed(row["gain_over_none"]),
             "-" if row["wall_s"] is None else f"{row['wall_s']:.0f}")
            for kind, row in summary["types"].items()]
    members = summary.get("teacher_members") or []
    held_members = (held or {}).get("teacher_members") or []

    def teacher_row(label: str, acc: Optional[float], held_acc: Optional[float]) -> tuple[str, ...]:
        shown = "-" if held_acc is None else f"{100 * held_acc:.2f}"
        return (label, "-", "-" if acc is None else f"{100 * acc:.2f}", "-", *([shown] if held else []), *["-"] * 5)

    rows.append(teacher_row("teacher" + (f" (ensemble of {len(members)})" if members else ""), summary["teacher_acc"],
                            (held or {}).get("teacher_acc")))
    rows += [teacher_row(f"  teacher {i}", acc, held_members[i] if i < len(held_members) else None)
             for i, acc in enumerate(members)]
    return format_rows(header, rows)
