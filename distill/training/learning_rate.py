"""DeiT's linear learning-rate scaling by the global batch, printed and logged when a fit starts."""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl

from distill.common.console import say
from distill.common.errors import UserError

__all__ = ["lr_scale", "scaled_lr"]


def scaled_lr(lr: float, batch_size: int, devices: int, num_nodes: int, accumulate: int, base: int) -> float:
    """DeiT's linear scaling rule: lr x (nodes x devices x batch x accumulation) / base."""
    return lr * num_nodes * devices * batch_size * accumulate / base



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
