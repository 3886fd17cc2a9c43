"""Hard distillation (Touvron et al., "Training data-efficient image transformers & distillation through
attention", 2021): the paper's best."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from distill.training.methods.base import LogitMethod

__all__ = ["Hard"]


class Hard(LogitMethod):
    """Hard distillation (DeiT): cross-entropy against the teacher's argmax, one term `distill`.

    The distillation head's cross-entropy, without label smoothing. With mixup/cutmix the teacher's argmax on the
    mixed view is the label. From a teacher cache it is exact (the argmax is the cache's first class).
    Standardisation changes no argmax: `standardize` z-scores the teacher alone and so changes nothing (the
    student's logits are left as they are)."""

    name: ClassVar[str] = "hard"
    order: ClassVar[int] = 2
    standardizes_student: ClassVar[bool] = False

    def __init__(self, standardize: bool = False) -> None:
        super().__init__(standardize)

    @property
    def reads_every_class(self) -> bool:
        """The teacher's argmax alone, which a z-score does not move: a top-k cache serves it with `standardize` too."""
        return False

    def terms(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"distill": F.cross_entropy(student, teacher.argmax(dim=-1))}
