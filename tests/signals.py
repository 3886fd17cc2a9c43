"""A callback that signals its own process at a chosen training step: crashes and preemptions, for real."""
import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends `signal_name` (SIGKILL, SIGTERM, ...) to this process after the optimiser step `step`."""

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))

