"""When Lightning writes a training step's logged values, and how the module logs from the host without waiting
for the device."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

__all__ = ["host_value", "step_log_interval", "writes_step_logs"]


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
