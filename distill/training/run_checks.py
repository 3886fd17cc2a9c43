"""The checks made before any training: the distillation module's when it is built (classes, teacher or cache, the
method against the cache, the optimiser) and `distill fit`'s (trainer counts, output folders, the monitored metric,
BatchNorm against the batch)."""
from __future__ import annotations

import difflib
import errno
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from timm.optim import get_optimizer_class, list_optimizers
from torch import nn

from distill.cache.format import TeacherCache
from distill.common.console import say
from distill.common.errors import UserError
from distill.common.files import ENVIRONMENT_ERRORS
from teachers import Teacher

__all__ = ["check_batch_norm_batch", "check_cache_holds", "check_classes", "check_monitor", "check_optimizer",
           "check_trainer_options", "check_writable", "teacher_beside_cache"]


def check_classes(student: nn.Module, teacher: Optional[Teacher], num_classes: int, distillation: str,
                   teacher_cache: Optional[str] = None) -> None:
    """Class-count and teacher presence checks, before any training starts."""
    if distillation != "none" and teacher is None and not teacher_cache:
        raise UserError(f"model.distillation is '{distillation}' but no model.teacher (or data.teacher_cache) is set; "
                         "set one or use 'none'")
    student_classes = getattr(student, "num_classes", num_classes)
    if student_classes != num_classes:
        raise UserError(f"student predicts {student_classes} classes but the dataset has {num_classes}")
    if teacher is not None and teacher.num_classes != num_classes:
        raise UserError(
            f"teacher '{teacher.model_name}' predicts {teacher.num_classes} classes but the dataset has "
            f"{num_classes}; train or fine-tune a teacher on these classes first (see configs/teacher.yaml)"
        )



def check_cache_holds(method: Any, teacher_cache: Optional[str], num_classes: int) -> None:
    """A method that reads every class's teacher probability (DKD, DIST) trains from a teacher cache only if the
    cache holds every class (its top-k is the number of classes); the rest of the mass is otherwise spread evenly."""
    if not teacher_cache or not method.reads_every_class:
        return
    top_k = TeacherCache.read_meta(Path(teacher_cache))["top_k"]
    if top_k < num_classes:
        standardized = not method.needs_full_distribution  # reads every class only through its z-score
        what = "with standardize (z-scored logits) " if standardized else ""
        instead = ("leave standardize off" if standardized else "use soft or hard, which a top-k cache serves")
        raise UserError(f"model.distillation '{method.name}' {what}reads every class's teacher probability, but "
                        f"data.teacher_cache '{teacher_cache}' holds the top {top_k} of {num_classes} (the rest spread "
                        f"evenly); build the cache with --top_k {num_classes}, train with the live teacher, or "
                        f"{instead}")



def check_optimizer(optimizer: str, fused: bool) -> None:
    """`model.optimizer` is a timm optimiser (with a close match if not); `model.fused_optimizer` needs its kernel."""
    if optimizer.lower() not in list_optimizers():
        close = difflib.get_close_matches(optimizer.lower(), list_optimizers(), n=3)
        raise UserError(f"model.optimizer: '{optimizer}' is not a timm optimiser"
                        f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} (DeiT: adamw)")
    if fused and "fused" not in inspect.signature(get_optimizer_class(optimizer.lower())).parameters:
        raise UserError(f"model.fused_optimizer: '{optimizer}' has no fused kernel (torch's adamw, adam, sgd have "
                        "one); set model.fused_optimizer: false")



def teacher_beside_cache(teacher: Optional[nn.Module], cache: Optional[str], verify: float) -> Optional[nn.Module]:
    """The teacher a run keeps: none beside a teacher cache unless it verifies the cache (`teacher_cache_verify`)."""
    assert 0.0 <= verify <= 1.0, verify  # ClosedUnitInterval on the command line
    if cache and verify > 0 and teacher is None:
        raise UserError("model.teacher_cache_verify needs model.teacher (the teacher the cache was built with)")
    if cache and verify == 0 and teacher is not None:
        say("model.teacher is not kept: data.teacher_cache replaces it "
            "(set model.teacher_cache_verify to check the cache against it)")
        return None
    return teacher


def check_batch_norm_batch(batch_size: int, model: Any) -> None:
    """A student with BatchNorm layers cannot train on batches of one image (BatchNorm's ValueError at the first step)."""
    if batch_size > 1:
        return
    norms = [name for name, m in model.student.named_modules()
             if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))]
    if norms:
        raise UserError(f"data.batch_size 1: the student has {len(norms)} BatchNorm layer(s) (e.g. '{norms[0]}'), which "
                        "need at least 2 images per batch to train; use data.batch_size 2 or more")



def check_trainer_options(config: Any) -> None:
    """The seed and the trainer's counts that Lightning would only reject with a ZeroDivisionError or ValueError."""
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
        raise UserError(f"seed_everything: {seed} is out of range (accepted: 0 .. 4294967295, or true for a random one)")
    trainer = config.get("trainer") or {}
    if not hasattr(trainer, "get"):  # `trainer: [1, 2]` in a file: jsonargparse keeps it
        raise UserError(f"trainer: expected the Trainer's options as a mapping (trainer: {{max_epochs: 10}}), got "
                        f"{trainer!r}")
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch"):
        value = trainer.get(key)
        if isinstance(value, int) and value < 1:
            raise UserError(f"trainer.{key}: {value} is out of range (accepted: 1 or more)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and interval <= 0:
        raise UserError(f"trainer.val_check_interval: {interval} is out of range (accepted: a fraction of an epoch "
                        "in (0, 1], or a number of batches of 1 or more)")



def check_monitor(monitor: str | None, model: Any) -> None:
    """checkpoint.monitor must name a metric validation logs (Lightning finds out only after the first epoch)."""
    if not monitor:
        return
    names = {f"val/{name}" for name in model.val_metrics.keys(keep_base=True)} | {"val/loss"}
    names |= {name.replace("val/", "val_ema/", 1) for name in names} if getattr(model, "ema", None) is not None else set()
    if monitor not in names and not monitor.startswith("train/"):
        close = difflib.get_close_matches(monitor, sorted(names), n=1)
        raise UserError(f"checkpoint.monitor: '{monitor}' is not a metric this run logs"
                        f"{f'; did you mean {close[0]!r}' if close else ''} (validation logs {', '.join(sorted(names)[:6])}, ...)")



def check_writable(option: str, folder: str | os.PathLike) -> None:
    """`folder` can be created and written: a probe file of 256 KiB in its nearest existing ancestor, which is left
    as it was (a run that fails before writing leaves no empty folder); a one-line error names the option otherwise."""
    if "://" in str(folder):  # remote storage (s3://, gs://): checked by its own client
        return
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write_check") as probe:
            probe.write(b"\0" * (256 << 10))  # flushed: a full disk fails here, not in a logger's thread later
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        advice = ENVIRONMENT_ERRORS.get(err.errno, "choose a folder you can write to")
        raise UserError(f"{option}: cannot write to '{folder}' ({err.strerror or err}); {advice}") from err
