"""DeiT's distillation loss (Touvron et al., arXiv 2012.12877, section 5).

    total = (1 - alpha) * base(cls_logits, target) + alpha * distill(dist_logits, teacher_logits)

base: soft-target cross-entropy when mixup/cutmix produced soft targets (their label
smoothing is folded in by timm's Mixup), else label-smoothing cross-entropy.
distill:
  - hard: cross-entropy against the teacher's argmax, no smoothing (the paper's best).
  - soft: KL(softmax(teacher / tau) || softmax(student / tau)) * tau^2. Normalised by the
    batch size (`batchmean`, as timm and the KL definition do). `kl_normalization="reference"`
    reproduces the reference code, which divides the summed KL by batch * classes, so its
    loss is 1/num_classes of the batch mean: alpha values from the reference code only
    transfer with that option.
  - none: no teacher. The distillation head then learns the labels too (base loss), so the
    averaged inference output is never half an untrained head, a pitfall of the reference
    code where `head_dist` gets no gradient but is still averaged in at evaluation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from distill.errors import UserError
from distill.ranges import (
    DISTILLATION_TYPES,
    ClosedUnitInterval,
    Distillation,
    HalfOpenUnitInterval,
    KLNormalization,
    PositiveFloat,
)

__all__ = ["DistillationLoss", "DISTILLATION_TYPES"]


class DistillationLoss(nn.Module):
    """Base loss plus none | soft | hard distillation; returns the total and its parts.

    Args:
        distillation: none | soft | hard.
        alpha: weight of the distillation term, (1 - alpha) goes to the base term.
        tau: softmax temperature of soft distillation.
        label_smoothing: smoothing of the base cross-entropy on hard labels.
        kl_normalization: batchmean (KL summed over classes, averaged over the batch) or
            reference (divided by batch * classes, as the DeiT reference code).
    """

    def __init__(
        self,
        distillation: Distillation = "hard",
        alpha: ClosedUnitInterval = 0.5,
        tau: PositiveFloat = 1.0,
        label_smoothing: HalfOpenUnitInterval = 0.1,
        kl_normalization: KLNormalization = "batchmean",
    ) -> None:
        super().__init__()
        if distillation not in DISTILLATION_TYPES:
            raise UserError(f"distillation must be one of {', '.join(DISTILLATION_TYPES)}, got '{distillation}'")
        if kl_normalization not in ("batchmean", "reference"):
            raise UserError(f"kl_normalization must be batchmean or reference, got '{kl_normalization}'")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must lie in [0, 1], got {alpha}")
        if tau <= 0:
            raise UserError(f"tau must be positive, got {tau}")
        self.distillation, self.alpha, self.tau = distillation, alpha, tau
        self.kl_normalization = kl_normalization
        self.hard_target_loss = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else nn.CrossEntropyLoss()
        self.soft_target_loss = SoftTargetCrossEntropy()

    def base(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices (B,) or mixup soft targets (B, C)."""
        if target.ndim == 2:
            return self.soft_target_loss(logits, target)
        return self.hard_target_loss(logits, target)

    def forward(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Returns {loss, loss_base, loss_distill}. Logits are (B, C); target is (B,) or (B, C)."""
        loss_base = self.base(cls_logits, target)
        if self.distillation == "none":
            loss_distill = self.base(dist_logits, target)
        elif teacher_logits is None:
            raise ValueError(f"distillation='{self.distillation}' needs teacher logits")
        elif self.distillation == "hard":
            loss_distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        else:
            loss_distill = self.soft_kl(dist_logits, teacher_logits)
        loss = (1.0 - self.alpha) * loss_base + self.alpha * loss_distill
        return {"loss": loss, "loss_base": loss_base, "loss_distill": loss_distill}

    def soft_kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) at temperature tau, times tau^2 (keeps gradient scale)."""
        kl = F.kl_div(
            F.log_softmax(student_logits.float() / self.tau, dim=-1),
            F.log_softmax(teacher_logits.float() / self.tau, dim=-1),
            reduction="sum",
            log_target=True,
        )
        denom = student_logits.numel() if self.kl_normalization == "reference" else student_logits.shape[0]
        return kl * (self.tau**2) / denom
