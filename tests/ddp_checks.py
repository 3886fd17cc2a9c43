"""A callback for the DDP test: checks what only a real multi-process run can show, per rank."""
import json
from pathlib import Path

import pytorch_lightning as pl
from torch.nn.parallel import DistributedDataParallel


class RecordRank(pl.Callback):
    """Writes, per rank: the training keys of epoch 0, whether DDP wraps the model and sees the teacher."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        wrapped = trainer.strategy.model
        ddp_params = {id(p) for p in wrapped.parameters()}
        record = {
            "world_size": trainer.world_size,
            "ddp": isinstance(wrapped, DistributedDataParallel),
            "teacher_in_ddp": any(id(p) in ddp_params for p in pl_module.teacher.parameters()),
            "keys": [list(key) for key in trainer.train_dataloader.sampler],
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
