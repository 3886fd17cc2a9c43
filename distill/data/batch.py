"""The training batch, with named fields instead of a positional tuple.

A training view is a function of (seed, epoch, index, repeat) (`distill.data.views.SeededViews`); a
batch of them carries that key with the images, so that mixing pairs, the teacher cache and
resumed runs can find the same views again. Validation and prediction batches stay plain
`(images, targets)` pairs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import default_collate

__all__ = ["TrainingBatch"]


@dataclass
class TrainingBatch:
    """A batch of seeded training views (Lightning moves every tensor field to the device).

    Attributes:
        images: (B, 3, H, W) the views, normalised; after mixing, the mixed images.
        targets: (B,) class indices, or (B, C) soft targets after mixup/cutmix.
        key: (B, 3) int64, the (epoch, index, repeat) of each view.
        seed: (B,) int64, the seed each view's random draws came from.
        mixing: (B, 6) float32 mixup/cutmix parameters of each pair (lam, cutmix, y0, y1, x0, x1),
            drawn on the CPU before the batch moves and used up once the images are mixed.
        teacher_index: (B, k) the cached teacher's top-k classes (with `data.teacher_cache`).
        teacher_prob: (B, k) their probabilities.
        checksum: (B,) the cached view's pixel checksum, float64 bits carried as int64 (MPS has no
            float64, and precision plugins never cast integers).
    """

    images: torch.Tensor
    targets: torch.Tensor
    key: torch.Tensor
    seed: torch.Tensor
    mixing: Optional[torch.Tensor] = None
    teacher_index: Optional[torch.Tensor] = None
    teacher_prob: Optional[torch.Tensor] = None
    checksum: Optional[torch.Tensor] = None

    @classmethod
    def collate(cls, views: list[dict[str, Any]]) -> "TrainingBatch":
        """The DataLoader's `collate_fn` for `SeededViews` items (dicts with the fields' names, one view each)."""
        fields = default_collate(views)
        return cls(images=fields.pop("image"), targets=fields.pop("target"), **fields)

    @property
    def cached(self) -> bool:
        """Whether the batch carries the teacher cache's outputs for its views."""
        return self.teacher_index is not None

    def replace(self, **changes: Any) -> "TrainingBatch":
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> "TrainingBatch":
        """The DataLoader's `pin_memory=True` hook for a custom batch type: every tensor in page-locked memory, so
        the copy to the GPU does not block the host (without it the batch silently stays pageable)."""
        return self.replace(**{field.name: value.pin_memory() for field in dataclasses.fields(self)
                               if isinstance(value := getattr(self, field.name), torch.Tensor)})
