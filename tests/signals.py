"""A callback that signals its own process at a chosen training step: crashes and preemptions, for real."""
import os
import signal
from typing import Optional

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends `signal_name` (SIGKILL, SIGTERM, ...) to this process after the optimiser step `step`
    (on every rank, or only on rank `rank`)."""

    def __init__(self, step: int, signal_name: str = "SIGKILL", rank: Optional[int] = None,
                 batch: Optional[int] = None) -> None:
        self.step, self.signal_name, self.rank, self.batch = step, signal_name, rank, batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.batch is not None and batch_idx != self.batch:  # a given batch of the step's epoch
            return
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))

