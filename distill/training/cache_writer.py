"""Writing a teacher cache: `trainer.predict` over every view of E epochs, mixed as training mixes them.

The format is `distill.cache.format`; the command that calls this is `distill cache-teacher`
(`distill.commands.cache_teacher`). Under DDP each rank labels its own share of the views into its own
shard (no file is written by two processes); rank 0 writes meta.json first, and renames
`OUT.partial` to `OUT` once every shard is complete.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from distill.cache.format import FORMAT, TeacherCache, library_versions
from distill.cache.targets import view_checksum
from distill.data.batch import TrainingBatch

__all__ = ["CacheSampler", "CacheWriter"]


class CacheSampler(DistributedSampler):
    """Every unit (a view, or a mixing pair) of epochs 0..E-1, split over ranks, each once.

    Lazy, one epoch at a time: a long schedule on a large dataset has billions of views.
    """

    def __init__(self, train_sampler: Any, epochs: int, num_replicas: int, rank: int) -> None:
        super().__init__(train_sampler.dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.train_sampler, self.epochs = train_sampler, epochs
        width = train_sampler.width
        # per epoch: every pair (or view); with repeated augmentation, the first dataset's worth of
        # units, which is all any world size trains on (EpochSampler.num_samples)
        self.units = units = len(train_sampler.dataset) // width
        self.views = epochs * units * width  # over all ranks
        self.rows = len(range(rank, units, num_replicas)) * width  # this rank's views per epoch
        self.share = epochs * self.rows

    def __iter__(self):  # type: ignore[override]
        for epoch in range(self.epochs):
            for unit in self.train_sampler.units(epoch)[: self.units][self.rank::self.num_replicas]:
                yield from unit

    def __len__(self) -> int:
        return self.share


class CacheWriter(pl.LightningModule):
    """`trainer.predict` over every view of E epochs: mix as training does, run the teacher, store top-k."""

    def __init__(self, data: Any, teacher: Any, epochs: int, top_k: int, out: Path, batch_size: int) -> None:
        super().__init__()
        self.data, self.epochs, self.top_k, self.out, self.batch_size = data, epochs, top_k, out, batch_size
        object.__setattr__(self, "teacher", teacher)  # not a submodule, as in DistillationModule
        self.cache: Optional[TeacherCache] = None
        self.partial = Path(f"{out}.partial")

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "CacheWriter":
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def setup(self, stage: str) -> None:
        self.data.setup("fit")
        train = self.data.train_set
        sampler = self.data.train_sampler()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        meta = {"format": FORMAT, "fingerprint": self.data.cache_fingerprint(train.dataset), "epochs": self.epochs,
                "versions": library_versions(),
                "repeats": sampler.num_repeats, "top_k": self.top_k, "teacher": self.teacher.config,
                "shards": world, "shard_rows": [CacheSampler(sampler, 1, world, r).rows for r in range(world)],
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.trainer.is_global_zero:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            TeacherCache.create_meta(self.partial, meta)
        self.trainer.strategy.barrier("teacher cache meta written")
        try:
            self.cache = TeacherCache.create_shard(self.partial, meta, rank)
        except BaseException:
            shutil.rmtree(self.partial, ignore_errors=True)  # a failed allocation leaves nothing behind
            raise
        self.trainer.strategy.barrier("teacher cache allocated")
        self.sampler = CacheSampler(sampler, self.epochs, world, rank)
        self.written = 0

    def predict_dataloader(self) -> DataLoader:
        data = self.data
        return DataLoader(data.train_set, batch_size=self.batch_size, sampler=self.sampler, drop_last=False,
                          num_workers=data.num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), collate_fn=TrainingBatch.collate)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.data.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.data.on_after_batch_transfer(batch, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        self.cache.write(self.written, batch.key, batch.seed, self.teacher(batch.images), view_checksum(batch.images))
        self.written += len(batch.key)

    def on_predict_end(self) -> None:
        self.cache.flush()
        if self.written != self.sampler.share:
            raise RuntimeError(f"teacher cache: rank {self.trainer.global_rank} wrote {self.written} of its "
                               f"{self.sampler.share} views in '{self.partial}'")
        self.trainer.strategy.barrier("teacher cache written")
        if not self.trainer.is_global_zero:
            return
        TeacherCache(self.partial, self.cache.meta).check_complete()  # every shard whole, every view once
        if self.out.exists():
            shutil.rmtree(self.out)  # --overwrite was given (checked before the build started)
        self.partial.rename(self.out)
