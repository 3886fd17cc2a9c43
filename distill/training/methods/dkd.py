"""Decoupled knowledge distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation")."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from distill.common.ranges import NonNegativeFloat, PositiveFloat
from distill.training.methods.base import LogitMethod, target_classes

__all__ = ["DKD"]


class DKD(LogitMethod):
    """KD split at the target class t: with p = softmax(z / tau),

        tckd = KL(b_T || b_S), b = (p_t, 1 - p_t)                 (target vs the rest)
        nckd = KL(p_hat_T || p_hat_S), p_hat = softmax over the classes other than t
        terms tckd and nckd, each times tau^2, averaged over the batch; weights alpha and beta

    both linearly warmed up over `warmup_epochs` (the paper's 20). The target class of a mixup/cutmix view is the
    class holding the most of its mixed target (`target_classes`). It reads every class's teacher probability: a
    teacher cache of fewer than all classes is refused. Defaults: the paper's CIFAR-100 setting (alpha 1, beta 8,
    tau 4; ImageNet: 0.5, 0.5, 1).

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        tau: softmax temperature.
        warmup_epochs: epochs over which both weights rise linearly from 0 (0: none).
        standardize: z-score the logits first (logit standardisation, Sun et al. 2024).
    """

    name: ClassVar[str] = "dkd"
    order: ClassVar[int] = 3
    needs_full_distribution: ClassVar[bool] = True

    def __init__(self, alpha: NonNegativeFloat = 1.0, beta: NonNegativeFloat = 8.0, tau: PositiveFloat = 4.0,
                 warmup_epochs: NonNegativeFloat = 20.0, standardize: bool = False) -> None:
        super().__init__(standardize)
        self.alpha, self.beta, self.tau, self.warmup_epochs = float(alpha), float(beta), float(tau), float(warmup_epochs)

    def terms(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = F.one_hot(target_classes(target), student.shape[-1]).bool()  # (B, C): the target class
        p_s, p_t = F.softmax(student / self.tau, dim=-1), F.softmax(teacher / self.tau, dim=-1)
        b_s, b_t = _binary(p_s, mask), _binary(p_t, mask)  # (B, 2)
        tckd = (b_t * (b_t.clamp_min(1e-12).log() - b_s.clamp_min(1e-12).log())).sum(-1).mean()
        # the non-target distribution: the target's logit pushed to -inf before the softmax (B, C)
        log_q_s = F.log_softmax(student / self.tau - 1000.0 * mask, dim=-1)
        log_q_t = F.log_softmax(teacher / self.tau - 1000.0 * mask, dim=-1)
        nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(mask, 0.0).sum(-1).mean()
        return {"tckd": tckd * self.tau**2, "nckd": nckd * self.tau**2}

    def weights(self, epoch: float = 0.0) -> dict[str, float]:
        ramp = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        return {"tckd": self.alpha * ramp, "nckd": self.beta * ramp}

    def options(self) -> dict[str, object]:
        return {"alpha": self.alpha, "beta": self.beta, "tau": self.tau, "warmup_epochs": self.warmup_epochs,
                "standardize": self.standardize}


def _binary(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(p_target, 1 - p_target) of each row (B, 2)."""
    target = (probs * mask).sum(-1, keepdim=True)
    return torch.cat([target, (probs * ~mask).sum(-1, keepdim=True)], dim=-1)
