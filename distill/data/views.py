"""Training views that are a function of (seed, epoch, sample index) only, and the bundled digits set.

`EpochSampler` shuffles by (seed, epoch) and hands each index to the dataset together with its epoch, and
`SeededViews` seeds every random number generator the transform uses from those numbers: the same view comes
back whatever the number of workers, processes or restarts (distill/training/datamodule.py's docstring says why).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from distill.common.errors import UserError
from distill.common.seeding import sample_seed, seeded

__all__ = ["DigitsDataset", "EpochSampler", "SeededViews"]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) as RGB PIL images.

    The split is fixed (stratified, 20% validation, seed 0: 1437 train / 360 val) so that
    every run and every stage is measured on the same images. Images are upscaled once to
    `img_size` (bicubic); the random transforms then work at that size.
    """

    def __init__(self, split: str, img_size: int, transform: Optional[Any] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=0)
        chosen = train_idx if split == "train" else val_idx
        pixels = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        self.images = [Image.fromarray(p).convert("RGB").resize((img_size, img_size), Image.BICUBIC) for p in pixels]
        self.targets = digits.target[chosen].tolist()
        self.classes = [str(c) for c in digits.target_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


class EpochSampler(DistributedSampler):
    """Shuffles by (seed, epoch), gives each rank its share, and yields `(epoch, index)` keys.

    A `DistributedSampler` (Lightning leaves those in place under DDP and calls `set_epoch`)
    that also passes the epoch to the dataset, so that `SeededViews` can seed each view from
    (seed, epoch, index) even inside persistent workers. `resume(epoch, samples)` skips the
    samples already trained on when a run restarts from a mid-epoch checkpoint.

    `num_repeats > 1` is DeiT's repeated augmentation (its `RASampler`): each index of the
    shuffled epoch appears `num_repeats` times in a row, so consecutive copies land on
    consecutive ranks (each rank sees its own augmented view, `(epoch, index, repeat)`), and
    each rank keeps `len(dataset) // num_replicas` samples, so an epoch stays one dataset
    long. (The reference also rounds that down to a multiple of 256 images; not done here.) timm's
    `RepeatAugSampler` repeats alike but yields bare indices and cannot skip into an epoch: hence this.

    `pairs=True` (mixup/cutmix on): the shuffled epoch is cut into fixed pairs (TinyViT's
    fixed mixing partners) and a pair is never split between ranks or batches (batches are
    even), so a mixed image depends on (seed, epoch, pair) only, not on the batch size or the
    number of processes. That is what lets a teacher cache replay it exactly.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
        num_repeats: int = 1, pairs: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        if num_repeats < 1:
            raise UserError(f"data.repeated_aug must be 1 (off) or more, got {num_repeats}")
        self.num_repeats, self.width = num_repeats, 2 if pairs else 1
        units = len(dataset) // self.width * num_repeats  # type: ignore[arg-type]
        if num_repeats > 1:  # an epoch stays one dataset long
            self.num_samples = len(dataset) // num_replicas // self.width * self.width  # type: ignore[arg-type]
        else:  # every unit, padded so that each rank gets as many
            self.num_samples = -(-units // num_replicas) * self.width
        self._resume_at: tuple[int, int] = (-1, 0)

    def resume(self, epoch: int, samples: int) -> None:
        """On the next pass over `epoch`, skip its first `samples` samples (already trained on)."""
        self._resume_at = (epoch, samples)

    def units(self, epoch: int) -> list[tuple[int, ...]]:
        """The epoch's units in order: one key, or the two keys of a mixing pair."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:  # DistributedSampler's own order: randperm seeded by seed + epoch
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(size))
        groups = [order[i:i + self.width] for i in range(0, size - size % self.width, self.width)]
        if self.num_repeats == 1:
            return [tuple((epoch, index) for index in group) for group in groups]
        return [tuple((epoch, index, repeat) for index in group) for group in groups for repeat in range(self.num_repeats)]

    def __iter__(self) -> Iterator[tuple[int, ...]]:  # type: ignore[override]
        epoch = self.epoch
        units = self.units(epoch)
        total = -(-len(units) // self.num_replicas) * self.num_replicas
        units += units[: total - len(units)]  # pad so that every rank gets as many
        keys = [key for unit in units[self.rank:total:self.num_replicas] for key in unit][: self.num_samples]
        if self._resume_at[0] == epoch:
            keys = keys[self._resume_at[1]:]
        self._resume_at = (-1, 0)
        return iter(keys)


class SeededViews(Dataset):
    """A training set whose item `(epoch, index)` is the view seeded by (seed, epoch, index).

    Every random draw of the transform (crop, flip, RandAugment, random erasing) comes from
    generators seeded for that sample, so the view is the same in any worker, process or
    restart. Item `(epoch, index, repeat)` is another view of the same image (repeated
    augmentation). An item is a dict of the fields of `distill.data.batch.TrainingBatch` for one view
    (`TrainingBatch.collate` makes the batch): `image`, `target`, the `key` (epoch, index, repeat)
    that mixup and the teacher cache use, the view's `seed`, and with a `cache`, the teacher's
    cached top-k for that view (`teacher_index`, `teacher_prob`, `checksum`). Plain integer
    indices pass through unseeded.
    """

    def __init__(self, dataset: Dataset, seed: int, cache: Optional[Any] = None) -> None:
        self.dataset, self.seed, self.cache = dataset, seed, cache

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        seed = sample_seed(self.seed, *key)  # key: (epoch, index) or (epoch, index, repeat)
        with seeded(seed):
            image, target = self.dataset[key[1]]
        full_key = (*key, 0) if len(key) == 2 else key
        view = {"image": image, "target": target, "key": torch.tensor(full_key, dtype=torch.int64),
                "seed": torch.tensor(seed, dtype=torch.int64)}
        if self.cache is not None:
            view.update(self.cache.entry(*full_key))
        return view
