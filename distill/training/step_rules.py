"""Rules the distillation module follows, apart from its training logic: when Lightning writes a step's logged
values, logging from the host, the metrics it validates with, DeiT's learning-rate scaling, and the class counts a
run needs."""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from timm.optim import get_optimizer_class, list_optimizers
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from distill.cache.format import TeacherCache
from distill.common.console import say
from distill.common.errors import UserError
from teachers import Teacher

__all__ = ["check_classes", "check_optimizer", "host_value", "lr_scale", "scaled_lr", "step_log_interval",
           "teacher_beside_cache", "validation_metrics", "writes_step_logs"]


def writes_step_logs(trainer: pl.Trainer, stepped: bool) -> bool:
    """Whether Lightning writes the values logged for this batch to the loggers, asked after the batch's step.

    Its rule from public state: every `log_every_n_steps` optimiser steps (0: never), every step of a
    `fast_dev_run`, and when the run stops; a value logged on another step is replaced before anyone reads it.
    """
    if not stepped:
        return False
    if trainer.fast_dev_run:
        return True
    every = trainer.log_every_n_steps
    return bool(every) and (trainer.global_step % every == 0 or trainer.should_stop)


def step_log_interval(every: int, steps_per_epoch: float) -> int:
    """`trainer.log_every_n_steps` for an epoch of `steps_per_epoch` optimiser steps: every step when the epoch is
    shorter than `every` (Lightning would write no training curve on small data: 3 steps an epoch, logged every 10,
    never reach a logged step before the run ends); `every` otherwise, and 0 (never) stays 0."""
    return 1 if every and steps_per_epoch < every else every


def host_value(value: float) -> torch.Tensor:
    """A value to `self.log` from the host: Lightning keeps a logged tensor where it is, and turns every progress-bar
    value into a number after every batch; a device tensor there would make the host wait for the device."""
    return torch.tensor(float(value), dtype=torch.float32)


def scaled_lr(lr: float, batch_size: int, devices: int, num_nodes: int, accumulate: int, base: int) -> float:
    """DeiT's linear scaling rule: lr x (nodes x devices x batch x accumulation) / base."""
    return lr * num_nodes * devices * batch_size * accumulate / base


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
        what = "with standardize (z-scored logits) " if not method.needs_full_distribution else ""
        raise UserError(f"model.distillation '{method.name}' {what}reads every class's teacher probability, but "
                        f"data.teacher_cache '{teacher_cache}' holds the top {top_k} of {num_classes} (the rest spread "
                        f"evenly); build the cache with --top_k {num_classes}, train with the live teacher, or use "
                        "soft or hard, which a top-k cache serves")


def validation_metrics(prefix: str, num_classes: int, members: int = 0, heads_only: bool = False) -> MetricCollection:
    """Top-1/top-5 of the class head, the distillation head and their average, the heads' and tokens' cosine; unless
    `heads_only` (the EMA's), the teacher's accuracy (and each of `members` ensemble members'), agreement and KL."""
    top5 = min(5, num_classes)
    metrics = {}
    for head in ("cls", "dist", ""):  # class head, distillation head, their average
        name = f"acc_{head}" if head else "acc"
        metrics[name] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        metrics[f"{name}_top5"] = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
    metrics["head_cosine"] = MeanMetric()  # cosine similarity of the two heads' logits
    metrics["token_cosine"] = MeanMetric()  # of the final class and distillation tokens (DeiT)
    if not heads_only:
        metrics["teacher_acc"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        for index in range(members):
            metrics[f"teacher_acc_{index}"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        metrics["teacher_agreement"] = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        metrics["teacher_kl"] = MeanMetric()  # KL(teacher || student), averaged head, temperature 1
    return MetricCollection(metrics, prefix=prefix)


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
    if not 0.0 <= verify <= 1.0:
        raise UserError(f"model.teacher_cache_verify must lie in [0, 1], got {verify}")
    if cache and verify > 0 and teacher is None:
        raise UserError("model.teacher_cache_verify needs model.teacher (the teacher the cache was built with)")
    if cache and verify == 0 and teacher is not None:
        say("model.teacher is not kept: data.teacher_cache replaces it "
            "(set model.teacher_cache_verify to check the cache against it)")
        return None
    return teacher


def lr_scale(trainer: pl.Trainer, lr: float, base: Optional[int]) -> float:
    """global batch / `base` (model.lr_scale_batch; 1 when it is unset), printed and logged at fit time."""
    if not base:
        return 1.0
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if batch_size is None:
        raise UserError("model.lr_scale_batch needs the data module's batch_size; set lr_scale_batch: null")
    scale = scaled_lr(1.0, batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches, base)
    global_batch = round(scale * base)
    say(
        f"lr scaled by the global batch: {lr:g} x {global_batch} / {base} = {lr * scale:.4g} "
        f"(global batch = {trainer.num_nodes} nodes x {trainer.num_devices} devices x {batch_size} images x "
        f"{trainer.accumulate_grad_batches} accumulated; min_lr and warmup_lr scaled alike)"
    )
    for logger in trainer.loggers:
        logger.log_metrics({"train/lr_scaled_peak": lr * scale, "train/global_batch": global_batch}, step=0)
    return scale
