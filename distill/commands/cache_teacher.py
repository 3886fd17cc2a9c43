"""`distill cache-teacher`: label every augmented view of a schedule with the config's teacher, once.

    distill cache-teacher --config configs/distill.yaml --epochs 30 --top_k 10 --out runs/cache
    distill fit --config configs/distill.yaml --data.teacher_cache runs/cache --model.teacher null --model.feature_weight 0
    distill cache-teacher --check runs/cache

The format is described in `distill.cache.format`; the labelling is `distill.training.cache_writer.CacheWriter`.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from distill.cache.format import TeacherCache
from distill.training.cache_writer import CacheSampler, CacheWriter
from distill.common.commandline import command
from distill.common.console import say
from distill.common.errors import UserError
from distill.common.files import OutputLock, free_bytes, human_size, lock_path, writing
from distill.common.ranges import PositiveInt
from distill.training.cli import make_cli

__all__ = ["main"]


def cache_teacher(epochs: Optional[PositiveInt] = None, top_k: PositiveInt = 10, out: Optional[str] = None,
                  batch_size: Optional[PositiveInt] = None, overwrite: bool = False, check: Optional[str] = None,
                  extra: Optional[list[str]] = None) -> None:
    """Write (or with `check`, check) a teacher cache for the training run that `extra` describes.

    Args:
        epochs: epochs of augmented views to label (the training run's max_epochs)
        top_k: teacher probabilities kept per view (TinyViT: 100 on ImageNet-22k)
        out: cache folder to write (each process writes its own shard: any shared filesystem, NFS too)
        batch_size: images per teacher forward (default: 4 x data.batch_size; no gradients, so larger fits)
        overwrite: replace an existing cache at --out
        check: check that the cache in this folder is complete and consistent, and exit
        extra: the training run's options: --config FILE and --data.* / --model.teacher.* / --trainer.* (devices,
            strategy, num_nodes) overrides, as for distill fit
    """
    rest = list(extra or [])
    if check:
        if rest or out or epochs:
            raise UserError("--check DIR takes no other option: it reads the cache alone")
        print(TeacherCache(Path(check), TeacherCache.read_meta(check, "--check")).check_complete())
        return
    for name, value in (("epochs", epochs), ("out", out)):
        if value is None:
            raise UserError(f"--{name} is required (or --check DIR to check a cache)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out: '{out}' exists; pass --overwrite to replace it, or choose another folder")
    if out.exists() and not (out / "meta.json").is_file():
        raise UserError(f"--out: '{out}' is not a teacher cache (no meta.json); --overwrite replaces only an earlier "
                        "cache: choose another folder")
    # one build per --out: the second is refused while the first holds the lock (rank 0 holds it for all ranks)
    lock = OutputLock(lock_path(out), f"cache-teacher --out '{out}'")
    if rank_zero_only.rank == 0:
        lock.acquire()
    try:
        with writing(out, "cache-teacher --out"):  # a full disk or a read-only folder met on the way: one line
            _build(out, epochs, top_k, batch_size, rest)
    finally:
        lock.release()


main = command("distill cache-teacher", cache_teacher, description=__doc__.split("\n\n")[0],
               extra="the training run: --config FILE and --data.* / --model.teacher.* / --trainer.* overrides, as for "
                     "distill fit")


def _build(out: Path, epochs: int, top_k: int, batch_size: Optional[int], rest: list[str]) -> None:
    with warnings.catch_warnings():  # the training options are `rest`, not the process's command line
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        # the teacher's outputs are stored, never its features: no imitation to set up (a ViT teacher has no stages)
        cli = make_cli([*rest, "--model.feature_weight=0", "--model.feature_pairs=null",  # and a method that has a
                        "--model.distillation=soft"], run=False,  # teacher: `none` would drop the one to cache
                       prog="distill cache-teacher")
    model, data, config = cli.model, cli.datamodule, cli.config
    teacher = model.teacher
    if teacher is None:
        raise UserError("model.teacher is null: a teacher cache needs the teacher of the config")
    if data.teacher_cache:
        raise UserError("data.teacher_cache is set: build a cache from a config that runs the real teacher")
    classes = data.num_classes
    batch_size = batch_size or 4 * data.batch_size
    if data.mixup_fn is not None and batch_size % 2:
        raise UserError(f"--batch_size must be even when mixup/cutmix is on (pairs are mixed), got {batch_size}")
    if not 1 <= top_k <= classes:
        raise UserError(f"--top_k must lie in 1..{classes} (the number of classes), got {top_k}")
    data.setup("fit")
    sampler = data.train_sampler()
    train_images = len(data.train_set)
    whole = CacheSampler(sampler, epochs, 1, 0)  # the shards of a multi-process build add up to it
    size = TeacherCache.nbytes(epochs, whole.rows, top_k, classes, sampler.num_repeats * train_images)
    views = whole.views
    per_epoch = views // epochs  # a dataset's worth (repeated augmentation too); mixing pairs leave an odd one out
    say(f"Teacher cache: {views} views ({epochs} epoch{'s' * (epochs != 1)} x {per_epoch}"
        f"{f' of the {train_images} images, in mixing pairs' if per_epoch != train_images else ' images'}), "
        f"top-{top_k} of {classes} classes; {human_size(size)} on disk at '{out}'")
    free = free_bytes(out)  # the filesystem that will hold OUT.partial and OUT
    if size > free:
        raise UserError(f"cache-teacher --out: the cache needs {human_size(size)} but the filesystem of '{out}' has "
                        f"{human_size(free)} free; free disk space or write elsewhere")
    trainer_cfg = config["trainer"]
    trainer = pl.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"), devices=trainer_cfg.get("devices", "auto"),
        num_nodes=trainer_cfg.get("num_nodes", 1), strategy=trainer_cfg.get("strategy", "auto"),
        precision=trainer_cfg.get("precision") or "32-true", logger=False, enable_checkpointing=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    writer = CacheWriter(data, teacher, epochs, top_k, out, batch_size)
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predict returned None")  # the writer stores, returns nothing
        trainer.predict(writer, return_predictions=False)
    if trainer.is_global_zero:
        seconds = time.monotonic() - started
        print(f"Teacher cache written to '{out}': {views} views in {seconds:.0f} s ({views / seconds:.0f} img/s)",
              file=sys.stderr)

