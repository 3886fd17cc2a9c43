"""Soft distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; DeiT's soft run)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from distill.common.ranges import KLNormalization, PositiveFloat
from distill.training.methods.base import LogitMethod

__all__ = ["Soft"]


class Soft(LogitMethod):
    """Soft distillation (Hinton et al. 2015): KL to the teacher's softened distribution, one term `distill`.

    KL(softmax(teacher / tau) || softmax(student / tau)) * tau^2.

    Normalised by the batch size (`batchmean`, as timm and the KL definition do); `reference` divides the summed
    KL by batch * classes, as the DeiT reference code does (its loss is 1/num_classes of the batch mean: alpha
    values from that code transfer only with it). With mixup/cutmix the teacher labels the mixed view itself: the
    targets are not used.

    Args:
        tau: softmax temperature (Hinton et al.: 1-20; DeiT's soft run: 3.0).
        kl_normalization: batchmean or reference (see above).
        standardize: z-score the logits first (logit standardisation, Sun et al. 2024).
    """

    name: ClassVar[str] = "soft"
    order: ClassVar[int] = 1

    def __init__(self, tau: PositiveFloat = 1.0, kl_normalization: KLNormalization = "batchmean",
                 standardize: bool = False) -> None:
        super().__init__(standardize)
        self.tau, self.kl_normalization = float(tau), kl_normalization

    def terms(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        kl = F.kl_div(F.log_softmax(student / self.tau, dim=-1), F.log_softmax(teacher / self.tau, dim=-1),
                      reduction="sum", log_target=True)
        denom = student.numel() if self.kl_normalization == "reference" else student.shape[0]
        return {"distill": kl * self.tau**2 / denom}

    def options(self) -> dict[str, object]:
        return {"tau": self.tau, "kl_normalization": self.kl_normalization, "standardize": self.standardize}
