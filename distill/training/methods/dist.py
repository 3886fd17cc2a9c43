"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher")."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from distill.common.ranges import NonNegativeFloat, PositiveFloat
from distill.training.methods.base import LogitMethod

__all__ = ["DIST"]


class DIST(LogitMethod):
    """DIST (Huang et al. 2022): Pearson correlations across classes and across the batch, not values.

    Relations instead of values: with Y = softmax(Z / tau) of the batch (B x C),

        inter = mean over samples i of 1 - Pearson(Y_S[i, :], Y_T[i, :])
        intra = mean over classes j of 1 - Pearson(Y_S[:, j], Y_T[:, j])
        terms inter and intra, each times tau^2; weights beta and gamma

    The targets are not used, so mixup/cutmix views need nothing more. The intra-class term reads every class's
    teacher probability over the batch: a teacher cache of fewer than all classes is refused. Defaults: the
    paper's ImageNet setting (beta = gamma = 1, tau = 1).

    Args:
        beta: weight of the inter-class (per sample) term.
        gamma: weight of the intra-class (per class, over the batch) term.
        tau: softmax temperature.
        standardize: z-score the logits first (logit standardisation, Sun et al. 2024).
    """

    name: ClassVar[str] = "dist"
    order: ClassVar[int] = 4
    needs_full_distribution: ClassVar[bool] = True

    def __init__(self, beta: NonNegativeFloat = 1.0, gamma: NonNegativeFloat = 1.0, tau: PositiveFloat = 1.0,
                 standardize: bool = False) -> None:
        super().__init__(standardize)
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    def terms(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        y_s, y_t = F.softmax(student / self.tau, dim=-1), F.softmax(teacher / self.tau, dim=-1)
        inter = 1 - _pearson(y_s, y_t).mean()  # along classes, per sample
        intra = 1 - _pearson(y_s.T, y_t.T).mean()  # along the batch, per class
        return {"inter": inter * self.tau**2, "intra": intra * self.tau**2}

    def weights(self, epoch: float = 0.0) -> dict[str, float]:
        return {"inter": self.beta, "intra": self.gamma}

    def options(self) -> dict[str, object]:
        return {"beta": self.beta, "gamma": self.gamma, "tau": self.tau, "standardize": self.standardize}


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (N,)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
