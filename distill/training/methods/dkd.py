"""Decoupled knowledge distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation")."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from distill.common.ranges import NonNegativeFloat, PositiveFloat
from distill.training.methods.base import LogitMethod, target_classes

__all__ = ["DKD"]


class DKD(LogitMethod):
    """Decoupled KD (Zhao et al. 2022): a target-class and a non-target-class term, weighted apart.

    KD split at the target class t: with p = softmax(z / tau),

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
        return {"tckd": _tckd(student / self.tau, teacher / self.tau, mask) * self.tau**2,
                "nckd": _nckd(student / self.tau, teacher / self.tau, mask) * self.tau**2}

    def weights(self, epoch: float = 0.0) -> dict[str, float]:
        ramp = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        return {"tckd": self.alpha * ramp, "nckd": self.beta * ramp}

    def options(self) -> dict[str, object]:
        return {"alpha": self.alpha, "beta": self.beta, "tau": self.tau, "warmup_epochs": self.warmup_epochs,
                "standardize": self.standardize}


def _log_split(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In log space, so that no probability underflows: log p_target, log (1 - p_target) (B,), and the log of the
    distribution over the other classes (B, C), 0 at the target (it is masked out of every sum)."""
    lse = z.logsumexp(-1)
    rest = z.masked_fill(mask, float("-inf")).logsumexp(-1)  # log of the other classes' mass, unnormalised
    log_target = z.masked_fill(~mask, 0.0).sum(-1) - lse
    return log_target, rest - lse, (z - rest[:, None]).masked_fill(mask, 0.0)


def _tckd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(b_T || b_S) of the binary (target, rest) distributions, batch mean."""
    s_target, s_rest, _ = _log_split(student, mask)
    t_target, t_rest, _ = _log_split(teacher, mask)
    kl = t_target.exp() * (t_target - s_target) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


def _nckd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_hat_T || p_hat_S) of the distributions over the non-target classes, batch mean."""
    _, _, log_q_s = _log_split(student, mask)
    _, _, log_q_t = _log_split(teacher, mask)
    return (log_q_t.exp().masked_fill(mask, 0.0) * (log_q_t - log_q_s)).sum(-1).mean()
