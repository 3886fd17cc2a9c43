"""The GPU check: every speed question of a GPU run in one command and one table.

    python benchmarks/gpu_check.py --out gpu_check.md     # on a GPU: 7 to 10 min on one H200
    python benchmarks/gpu_check.py --smoke                # on a CPU: the same code paths, tiny (the tests run it)

For DeiT-Ti and DeiT-S students with the RegNetY-16GF teacher at 224 px (random weights,
synthetic batches: speed does not depend on either), every row of `train_speed.py` that a GPU
user weighs: the plain PyTorch loop (fp32, and bf16 autocast as the reference DeiT trains with
AMP), timm's `TokenDistillationTask`, this project's `fit` with the default teacher (fp32 and
bf16-mixed student), with a fused optimiser, the teacher in NCHW, `teacher.compile`,
`model.compile`, and from the teacher cache. Each row runs in its own process (fresh memory);
the table gives images/s, the ratio to the bf16 plain loop, the share of the step spent in the
teacher's forward, peak allocated memory, the student's model FLOP utilisation (the student's
training FLOPs per image, forward + backward, counted by `torch.utils.flop_counter` on the real
model, x images/s / the card's dense bf16 peak) and the warm-up's seconds (compiles included).
A second table profiles `--profile-steps` more steps of each row with `torch.profiler`: the step
under the profiler, the device's busy time, kernel launches, the host's waits for the device
(synchronisations) and copies back, the aten ops dispatched and scalars read, and the share of
the step the device sat idle (on a CPU the device columns are `-`); with `--out` each row's
profiler table goes to `<out>_profiles/<student>_<row>.txt` (`--traces`: and its trace,
.json.gz). Rows run in order of importance within `--budget-s`; the tables are rewritten to
`--out` after every row, so a run cut short keeps what it measured.

What the GPU image needs beside its torch, pytorch-lightning, torchmetrics and tensorboard:
jsonargparse (the option types of `distill.training.module` import it; its optional extras are not
needed) and this project's timm (the image's may predate `timm.task`), exactly these two wheels,
fetched on a machine with pip and carried there:

    python3 -m pip download --no-deps -d .whl jsonargparse==4.53.0 timm==1.0.31
    # there:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --out $OUT/gpu_check.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_speed  # this folder

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by device name
BF16_PEAK_TFLOPS = {"H200": 989.4, "GH200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4,
                    "A100": 312.0, "A10G": 70.0, "L40S": 362.0, "L4": 121.0, "B200": 2250.0}
GPU_ROWS = ["plain_bf16", "fit_bf16", "timm_task_bf16", "fit_cache_bf16", "fit_fused_bf16", "fit_nchw_bf16"]
# the compiles take a minute or two each: after every other row
LAST_ROWS = ["fit_student_compile_bf16", "fit_cache_student_compile_bf16", "fit_compile_bf16"]
STUDENTS = {"deit_tiny": "DeiT-Ti", "deit_small": "DeiT-S"}


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def training_flops(student: str, classes: int, img_size: int) -> tuple[float, str]:
    """FLOPs of one image's training step in the student (forward of both heads + backward), counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from students import Student
    torch.manual_seed(0)
    model = Student(classes, img_size, model_name=student).train()
    images = torch.randn(2, 3, img_size, img_size)
    with FlopCounterMode(display=False) as counter:
        cls_logits, dist_logits = model.forward_heads(images)
        (cls_logits.sum() + dist_logits.sum()).backward()
    return counter.get_total_flops() / 2, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"


def teacher_flops(teacher: str, classes: int, img_size: int) -> float:
    """FLOPs of one image's forward in the teacher, counted."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    model = timm.create_model(teacher, num_classes=classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops()


def table(lines: list[dict[str, Any]], peak: float | None) -> list[str]:
    out = ["| student | setting | batch | img/s | x plain bf16 | teacher share | step ms | peak GiB | student MFU "
           "| warm-up s |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in lines:
        if r.get("skipped"):
            out.append(f"| {r['student']} | {train_speed.ROWS[r['row']][0]} | {r['batch']} | {r['skipped']} "
                       "| | | | | | |")
            continue
        base = next((b["img_per_s"] for b in lines if b["student"] == r["student"] and b["row"] == "plain_bf16"
                     and not b.get("skipped")), None)
        ratio = f"{r['img_per_s'] / base:.2f}" if base else "-"
        mfu = f"{r['img_per_s'] * r['flops'] / (peak * 1e12):.1%}" if peak else "-"
        share = r["teacher_s_per_step"] / r["step_s"] if r["step_s"] else 0.0
        out.append(f"| {r['student']} | {train_speed.ROWS[r['row']][0]} | {r['batch']} | {r['img_per_s']:.0f} | "
                   f"{ratio} | {share:.0%} | {r['step_s'] * 1e3:.0f} | {r['peak_mib'] / 1024:.1f} | {mfu} | "
                   f"{r['warmup_s']:.0f} |")
    return out


def tables(lines: list[dict[str, Any]], peak: float | None, profile_steps: int) -> list[str]:
    profiled = [f"Under torch.profiler, {profile_steps} steps after the timed ones, per step (with --out, each row's "
                "profiler table in <out>_profiles/):", "", *profile_table(lines)] if profile_steps else []
    return ["", *table(lines, peak), "", *profiled]


def profile_table(lines: list[dict[str, Any]]) -> list[str]:
    """Per row and step, under torch.profiler: where the step's time goes besides the kernels themselves."""
    def cell(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)
    out = ["| row | student | step ms | device busy ms | launches | syncs | copies back | aten ops | scalar reads "
           "| device idle |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in lines:
        p = r.get("profile")
        if p:
            out.append(f"| {r['row']} | {r['student']} | {p['step_ms']:.1f} | {cell(p['device_ms'], '.1f')} | "
                       f"{cell(p['launches'], '.0f')} | {cell(p['waits'], '.1f')} | {cell(p['copies_back'], '.1f')} | "
                       f"{p['ops']:.0f} | {p['scalar_reads']:.1f} | {cell(p['idle'], '.0%')} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", default="deit_tiny,deit_small")
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", default="256,256", help="images per step, one per student")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=10, help="steps profiled after the timed ones (0: none)")
    parser.add_argument("--traces", action="store_true", help="with --out, also each row's profiler trace (.json.gz)")
    parser.add_argument("--rows", default=",".join(GPU_ROWS + LAST_ROWS),
                        help="rows of train_speed.py, in order of importance")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no row after this many seconds")
    parser.add_argument("--row-timeout-s", type=float, default=240.0)
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown), after every row")
    parser.add_argument("--smoke", action="store_true",
                        help="a CPU run of every code path in seconds: tiny teacher, 32 px, 2 steps")
    args = parser.parse_args()
    if args.smoke:
        args.teacher, args.img_size, args.classes, args.steps, args.warmup = "test_resnet", 32, 10, 2, 1
        args.profile_steps = min(args.profile_steps, 2)
    students = args.students.split(",")
    if args.smoke:
        args.batch = ",".join("4" for _ in students)
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) != len(students):
        parser.error(f"--batch: one size per student ({len(students)}), got '{args.batch}'")
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in train_speed.ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; one of {', '.join(train_speed.ROWS)}")
    device = torch.device(args.device)
    peak = args.peak_tflops or bf16_peak(device)
    profiles = args.out.with_name(f"{args.out.stem}_profiles") if args.out and args.profile_steps else None

    import pytorch_lightning as pl
    import timm
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"{card}, dense bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (--peak-tflops)'}; "
              f"torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, Lightning "
              f"{pl.__version__}; teacher {args.teacher} ({teacher_flops(args.teacher, args.classes, args.img_size) / 1e9:.1f}"
              f" GFLOP/img forward), {args.img_size} px, {args.classes} classes, {args.steps} timed steps after "
              f"{args.warmup}")
    flops = {}
    for student in students:
        flops[student], size = training_flops(student, args.classes, args.img_size)
        header += f"; {STUDENTS.get(student, student)} {size}, {flops[student] / 1e9:.1f} GFLOP/img training"
    print(header, flush=True)

    order = [(r, s, b) for s, b in zip(students, batches) for r in rows if r not in LAST_ROWS] + \
            [(r, s, b) for r in rows if r in LAST_ROWS for s, b in zip(students, batches)]
    start, results = time.monotonic(), []
    for row, student, batch in order:
        entry: dict[str, Any] = {"student": STUDENTS.get(student, student), "row": row, "batch": batch}
        if time.monotonic() - start > args.budget_s:
            entry["skipped"] = "not run (budget)"
        else:
            argv = [f"--student={student}", f"--teacher={args.teacher}", f"--img-size={args.img_size}",
                    f"--batch={batch}", f"--classes={args.classes}", f"--steps={args.steps}",
                    f"--warmup={args.warmup}", f"--device={args.device}", f"--profile-steps={args.profile_steps}",
                    *([f"--profile-dir={profiles}"] if profiles else []),
                    *(["--profile-trace"] if args.traces else [])]
            result = train_speed.measure_row(argv, row, torch.get_num_threads(), args.row_timeout_s)
            entry.update(result or {"skipped": "failed (see above)"})
            entry["flops"] = flops[student]
            print(f"  {entry['student']} {row}: " + (f"{entry['img_per_s']:.0f} img/s" if result else entry["skipped"])
                  + f" ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
        results.append(entry)
        if args.out:
            args.out.write_text("\n".join([header, *tables(results, peak, args.profile_steps)]) + "\n")
    print("\n".join(tables(results, peak, args.profile_steps)))
    agreements = {f"{r['student']} {r['row']}": f"{r['agreement']:.1%} ({r['teacher_dtype']})"
                  for r in results if r.get("agreement") is not None}
    if agreements:
        print("teacher fast path, top-1 agreement with fp32 on the first batch (random weights: near ties): "
              + ", ".join(f"{k} {v}" for k, v in agreements.items()))
    if any(r.get("skipped") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
