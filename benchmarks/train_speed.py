"""Distillation training-step throughput, side by side in one run: a plain PyTorch loop (the
reference DeiT way), timm's own token-distillation task (`timm.task`), and this project's
`fit` (fp32 teacher, default fast teacher, teacher cache), plus DDP 2x1 against 1x2.

    python benchmarks/train_speed.py                       # DeiT-tiny + RegNetY-16GF at 224, batch 16 (7 min here)
    python benchmarks/train_speed.py --student deit_tiny --teacher resnet10t --img-size 32 --batch 64 --steps 20

Every row runs in its own process (same threads, fresh memory) on the same synthetic batch
bank (random images, labels; random weights: speed does not depend on them), so the rows
differ only in how the step is done. Throughput counts the wall time of `--steps` full
steps after `--warmup` steps (data fetch, hooks, logging, optimiser included). The teacher
column is the time spent in the teacher's forward, per step (on a GPU timed by events in the
stream, so the step never waits for it); memory is the process's peak RSS (CPU) or peak
allocated memory (GPU). The cache row reads the teacher's top-k from the batch, as
`fit --data.teacher_cache` does (the augmentation a real run adds is the same for every row and
not measured here). `--profile-steps N` runs `torch.profiler` over N more steps after the timed
ones (`gpu_check.py` prints what it found: kernel launches, host-device waits, device idle time).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from step_profile import StepProfile, sync  # noqa: E402  (this folder)

ROWS = {  # name: (label, how the step is done: plain loop / timm task / fit, and its settings)
    "plain": ("plain PyTorch loop, fp32 teacher (reference DeiT)", {"kind": "plain"}),
    "plain_bf16": ("plain PyTorch loop, bf16 autocast (reference DeiT, AMP)", {"kind": "plain", "precision": "bf16-mixed"}),
    "fit_fp32": ("this project's fit, fp32 teacher", {"teacher": "32"}),
    "timm_task": ("timm.task.TokenDistillationTask, fp32 teacher", {"kind": "timm_task"}),
    "timm_task_bf16": ("timm.task.TokenDistillationTask, bf16 autocast", {"kind": "timm_task", "precision": "bf16-mixed"}),
    "fit": ("this project's fit, default teacher (precision auto)", {}),
    "fit_compile": ("this project's fit, default teacher + teacher.compile", {"compile": True}),
    "fit_bf16": ("fit as the DeiT-tiny config: bf16-mixed student, default teacher", {"precision": "bf16-mixed"}),
    "fit_compile_bf16": ("fit, bf16-mixed student, default teacher + teacher.compile",
                         {"precision": "bf16-mixed", "compile": True}),
    "fit_cache": ("this project's fit, teacher cache", {"cache": True}),
    "fit_cache_bf16": ("fit, bf16-mixed student, teacher cache", {"cache": True, "precision": "bf16-mixed"}),
    "fit_ddp_2x1": ("fit, default teacher, DDP 2 processes x 1 thread", {"devices": 2}),
    "fit_cache_ddp_2x1": ("fit, teacher cache, DDP 2 processes x 1 thread", {"cache": True, "devices": 2}),
    "fit_fused_bf16": ("fit, bf16-mixed student, default teacher, fused AdamW (model.fused_optimizer)",
                       {"precision": "bf16-mixed", "fused_optimizer": True}),
    "fit_nchw_bf16": ("fit, bf16-mixed student, default teacher in NCHW (teacher.channels_last: false)",
                      {"precision": "bf16-mixed", "channels_last": False}),
    "fit_student_compile_bf16": ("fit, bf16-mixed student + model.compile, default teacher",
                                 {"precision": "bf16-mixed", "compile_student": True}),
    "fit_cache_student_compile_bf16": ("fit, bf16-mixed student + model.compile, teacher cache",
                                       {"cache": True, "precision": "bf16-mixed", "compile_student": True}),
}


# ---------------------------------------------------------------------------------- the work
class Bank(torch.utils.data.Dataset):
    """The same batch of random images and labels, `count` times (pinned on CUDA machines, so the
    copy to the GPU is the only data cost): (images, labels) for the plain loops,
    or the `distill.data.batch.TrainingBatch` that `fit` gets from `SeededViews` (with random cached
    top-k for the cache rows). Whole batches: per-image collation would cost as much as a GPU step."""

    def __init__(self, count: int, batch: int, img_size: int, classes: int, cache: bool, views: bool = True,
                 top_k: int = 10) -> None:
        from distill.data.batch import TrainingBatch
        g = torch.Generator().manual_seed(0)
        pin = torch.cuda.is_available()
        images = torch.randn(batch, 3, img_size, img_size, generator=g)
        labels = torch.randint(0, classes, (batch,), generator=g)
        self.count = count
        if not views:
            self.batch: Any = (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)
            return
        fields: dict[str, Any] = {"key": torch.stack([torch.zeros(batch, dtype=torch.int64), torch.arange(batch),
                                                      torch.zeros(batch, dtype=torch.int64)], 1),
                                  "seed": torch.arange(batch)}
        if cache:
            prob, index = torch.rand(batch, classes, generator=g).softmax(-1).topk(top_k)
            fields.update(teacher_index=index, teacher_prob=prob.half(),
                          checksum=torch.zeros(batch, dtype=torch.float64).view(torch.int64))
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        self.batch = TrainingBatch(images=images, targets=labels, **fields)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Any:
        return self.batch


def loader(args: argparse.Namespace, count: int, cache: bool = False, views: bool = True
           ) -> torch.utils.data.DataLoader:
    bank = Bank(count, args.batch, args.img_size, args.classes, cache, views)
    return torch.utils.data.DataLoader(bank, batch_size=None, collate_fn=lambda batch: batch)


def student(args: argparse.Namespace) -> torch.nn.Module:
    from students import Student
    return Student(args.classes, args.img_size, model_name=args.student)


class TeacherClock:
    """The time spent in a module's forward, summed over the steps since `reset`. On a GPU it is the stream's time
    between two events recorded around the call, read at the end: the step itself never waits for it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.spans: list[tuple[Any, Any]] = []
        self.host_s = 0.0
        forward = module.forward

        def wrapper(*a: Any, **k: Any) -> Any:
            if torch.cuda.is_available():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = forward(*a, **k)
                end.record()
                self.spans.append((start, end))
                return out
            began = time.perf_counter()
            out = forward(*a, **k)
            self.host_s += time.perf_counter() - began
            return out
        module.forward = wrapper

    def reset(self) -> None:
        self.spans, self.host_s = [], 0.0

    def seconds(self) -> float:
        """After a synchronisation: the total since `reset`."""
        return self.host_s + sum(start.elapsed_time(end) for start, end in self.spans) / 1e3


def profile_of(args: argparse.Namespace, device: torch.device) -> Optional[StepProfile]:
    if not args.profile_steps:
        return None
    table = Path(args.profile_dir) / f"{args.student}_{args.row}" if args.profile_dir else None
    return StepProfile(device, args.profile_steps, table, args.profile_trace)


def run_plain(args: argparse.Namespace, device: torch.device, use_timm_task: bool, precision: str
              ) -> dict[str, Any]:
    import timm
    torch.manual_seed(0)
    model = student(args).to(device)
    teacher = timm.create_model(args.teacher, num_classes=args.classes).to(device).eval().requires_grad_(False)
    clock = TeacherClock(teacher)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    if use_timm_task:
        from timm.task import TokenDistillationTask
        task = TokenDistillationTask(model.model, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type="hard",
                                     task_loss_weight=0.5, device=device, verbose=False).train()

        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return task(images, labels)["loss"]
    else:
        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_labels = teacher(images).argmax(-1)
            cls_logits, dist_logits = model.forward_heads(images)
            return 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(dist_logits, teacher_labels)
    model.train()
    profile = profile_of(args, device)
    began = time.perf_counter()
    for i, (images, labels) in enumerate(loader(args, args.warmup + args.steps + args.profile_steps, views=False)):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = step(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i + 1 == args.warmup:  # timed from the end of the last warm-up step, as the fit rows
            sync(device)
            start = time.perf_counter()
            warmup_s = start - began
            clock.reset()
        if i + 1 == args.warmup + args.steps:
            sync(device)
            end = time.perf_counter()
            teacher_s = clock.seconds()
            if profile:
                profile.start()
    if profile:
        profile.stop()
    return {"seconds": end - start, "teacher_s": teacher_s, "warmup_s": warmup_s,
            "profile": profile.summary if profile else None}


def run_fit(args: argparse.Namespace, device: torch.device, teacher: str = "auto", cache: bool = False,
            devices: int = 1, precision: str = "", compile: bool = False, compile_student: bool = False,
            fused_optimizer: bool = False, channels_last: Optional[bool] = None) -> dict[str, Any]:
    import pytorch_lightning as pl

    from distill.training.module import DistillationModule
    from teachers import Teacher

    torch.manual_seed(0)
    # random weights: near-tied logits make the first-batch agreement check meaningless, so no fallback here
    frozen = Teacher(args.teacher, weights="none", num_classes=args.classes, precision=teacher,
                     channels_last=teacher != "32" if channels_last is None else channels_last, compile=compile,
                     fast_min_agreement=0.0)
    clock = TeacherClock(frozen)
    module = DistillationModule(student(args), None if cache else frozen, num_classes=args.classes,
                                img_size=args.img_size, teacher_cache="bench" if cache else None, warmup_epochs=0,
                                compile=compile_student, fused_optimizer=fused_optimizer)
    marks: dict[str, float] = {}
    profile = profile_of(args, device)

    class Clock(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
            marks["began"] = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == args.warmup:
                sync(device)
                marks["start"] = time.perf_counter()
                clock.reset()
            if trainer.global_step == args.warmup + args.steps:
                sync(device)
                marks["end"], marks["teacher"] = time.perf_counter(), clock.seconds()
                if profile:
                    profile.start()
            if profile and trainer.global_step == args.warmup + args.steps + args.profile_steps:
                profile.stop()

    steps = args.warmup + args.steps + args.profile_steps
    trainer = pl.Trainer(
        accelerator=device.type, devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        precision=precision or args.precision, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, limit_val_batches=0, callbacks=[Clock()], num_sanity_val_steps=0,
    )
    trainer.fit(module, loader(args, steps, cache))
    return {"seconds": marks["end"] - marks["start"], "teacher_s": marks["teacher"], "world": trainer.world_size,
            "warmup_s": marks["start"] - marks["began"], "rank": trainer.global_rank,
            "agreement": None if cache else frozen.fast_agreement,
            "teacher_dtype": None if cache else str(frozen.fast_dtype or torch.float32),
            "profile": profile.summary if profile else None}


def measure(args: argparse.Namespace) -> None:
    """One row, in this process; prints one JSON line."""
    device = torch.device(args.device)
    if args.row not in ROWS:
        raise SystemExit(f"--row: unknown row '{args.row}'; one of {', '.join(ROWS)}")
    settings = dict(ROWS[args.row][1])
    kind = settings.pop("kind", "fit")
    if kind == "fit":
        result = run_fit(args, device, **settings)
    else:
        result = run_plain(args, device, kind == "timm_task", settings.get("precision", args.precision))
    if result.get("rank", 0):
        return
    world = result.get("world", 1)
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(json.dumps({"row": args.row, "img_per_s": args.steps * args.batch * world / result["seconds"],
                      "teacher_s_per_step": result["teacher_s"] / args.steps, "step_s": result["seconds"] / args.steps,
                      "warmup_s": result["warmup_s"], "peak_mib": memory, "threads": torch.get_num_threads(),
                      "world": world, "agreement": result.get("agreement"),
                      "teacher_dtype": result.get("teacher_dtype"), "profile": result.get("profile")}))


def measure_row(argv: list[str], row: str, threads: int, timeout: float | None = None) -> dict[str, Any] | None:
    """Run one row in a fresh process (same threads, fresh memory); its result, or None (failure printed)."""
    threads = 1 if row.endswith("ddp_2x1") else threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        run = subprocess.run([sys.executable, __file__, *argv, "--row", row], env=env, capture_output=True, text=True, check=False,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{row}: stopped after {timeout:.0f} s", file=sys.stderr, flush=True)
        return None
    lines = [line for line in run.stdout.splitlines() if line.startswith('{"row"')]
    if run.returncode or not lines:
        print(f"{row}: failed\n{run.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(lines[-1])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="deit_tiny")
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="images per process and step")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                        help="the student's precision (every row but the *_bf16 ones)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="plain,fit_fp32,timm_task,fit,fit_compile,fit_bf16,fit_cache,fit_cache_bf16,"
                        "fit_ddp_2x1,fit_cache_ddp_2x1,plain,fit_fp32",  # repeats: the noise, averaged
                        help="comma-separated rows (repeats allowed) of: " + ", ".join(ROWS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of a 1-process row")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="torch.profiler over this many steps after the timed ones (0: none)")
    parser.add_argument("--profile-dir", help="write each row's profiler table here (<student>_<row>.txt)")
    parser.add_argument("--profile-trace", action="store_true", help="and its trace (.json.gz)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.row:
        return measure(args)
    results: list[dict[str, Any]] = []  # a row may be listed twice (repeats show the noise)
    for row in args.rows.split(","):
        result = measure_row(sys.argv[1:], row, args.threads)
        if result:
            results.append(result)
            print(f"  measured {row}: {result['img_per_s']:.2f} img/s", file=sys.stderr, flush=True)

    import pytorch_lightning as pl
    import timm
    print(f"\n{args.student} student + {args.teacher} teacher, {args.img_size} px, batch {args.batch} per process, "
          f"student {args.precision}, {args.device}, torch {torch.__version__}, timm {timm.__version__}, "
          f"Lightning {pl.__version__}, {args.steps} timed steps after {args.warmup}")
    plain = [r["img_per_s"] for r in results if r["row"] == "plain"]  # x plain: against their mean
    base_speed = sum(plain) / len(plain) if plain else None
    width = max(len(ROWS[r["row"]][0]) for r in results) if results else 10
    print(f"| {'setting':{width}s} | img/s | x plain | teacher s/step | step s | peak MiB |")
    print(f"|{'-' * (width + 2)}|------:|--------:|---------------:|-------:|---------:|")
    for r in results:
        ratio = f"{r['img_per_s'] / base_speed:7.2f}" if base_speed else "      -"
        print(f"| {ROWS[r['row']][0]:{width}s} | {r['img_per_s']:5.2f} | {ratio} | {r['teacher_s_per_step']:14.2f} | "
              f"{r['step_s']:6.2f} | {r['peak_mib']:8.0f} |")
    for r in results:
        if r.get("agreement") is not None:
            print(f"{r['row']}: teacher {r['teacher_dtype']}, top-1 agreement with fp32 on its first batch "
                  f"{r['agreement']:.1%}")


if __name__ == "__main__":
    main()
