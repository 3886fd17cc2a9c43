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

`LossRecord` keeps the parts of each training batch on the device until the host reads them,
every few steps, in one copy (a training step reads nothing from the device: docs/speed.md).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from distill.common.errors import UserError
from distill.common.ranges import (
    DISTILLATION_TYPES,
    ClosedUnitInterval,
    Distillation,
    HalfOpenUnitInterval,
    KLNormalization,
    PositiveFloat,
)

__all__ = ["DistillationLoss", "LossRecord", "DISTILLATION_TYPES", "loss_options"]


class DistillationLoss(nn.Module):
    """Base loss plus none | soft | hard distillation; returns the total and its parts.

    Args:
        distillation: none | soft | hard (the paper's best: hard; none trains on the labels alone).
        alpha: weight of the distillation term, (1 - alpha) goes to the label term (DeiT: 0.5).
        tau: softmax temperature of soft distillation (DeiT's soft run: 3.0).
        label_smoothing: smoothing of the label cross-entropy (DeiT: 0.1; folded into mixup's targets).
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


def loss_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`DistillationLoss`'s options with its defaults filled in: the one declaration of them (the training module
    takes them as `**loss` and records them flat among its hyper-parameters)."""
    bound = inspect.signature(DistillationLoss).bind(**options)
    bound.apply_defaults()
    return dict(bound.arguments)


class LossRecord:
    """Each training batch's loss parts, kept on the device until the host needs them.

    Reading a device value (`.item()`, `bool(t)`, a progress bar's number) makes the host wait until the device
    has run everything queued before it; done every step, the device idles while the host prepares the next one.
    The parts of each batch are stacked on the device (one kernel) and read in one copy when a check or a log
    needs them.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.rows: list[torch.Tensor] = []  # (batches, P) float32 since the last check, on the device
        self.where: list[tuple[int, int, int]] = []  # (epoch, global step, batch) of each row
        self.last_read: tuple[tuple[int, int, int], dict[str, float]] = ((0, 0, 0), {})

    def add(self, parts: dict[str, torch.Tensor], where: tuple[int, int, int]) -> None:
        self.names = tuple(parts)
        self.rows.append(torch.stack([v.detach().float() for v in parts.values()])[None])  # (1, P)
        self.where.append(where)
        if len(self.rows) >= 256:  # a long wait between checks: one tensor, not hundreds of small allocations
            self.rows = [torch.cat(self.rows)]

    def latest(self) -> dict[str, float]:
        """The latest batch's parts (one read from the device, none if the last check just read it)."""
        if self.rows:
            self.last_read = (self.where[-1], dict(zip(self.names, self.rows[-1][-1].tolist())))
        return self.last_read[1]

    def first_non_finite(self) -> Optional[tuple[tuple[int, int, int], dict[str, float]]]:
        """Reads every batch since the last call (one copy) and forgets them: the first whose loss is NaN or inf."""
        if not self.rows:
            return None
        read = [dict(zip(self.names, row)) for row in torch.cat(self.rows).tolist()]  # (N, P) in one copy
        where, self.rows, self.where = self.where, [], []
        self.last_read = (where[-1], read[-1])
        return next(((w, parts) for w, parts in zip(where, read) if not math.isfinite(parts["loss"])), None)
