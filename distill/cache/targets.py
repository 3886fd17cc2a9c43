"""What training takes from a teacher cache: the teacher's targets rebuilt from the stored top-k, and the checksum
that tells whether a replayed view is the view the teacher labelled (distill/cache/format.py stores both)."""
from __future__ import annotations

import torch

__all__ = ["cached_teacher_logits", "view_checksum"]


def view_checksum(images: torch.Tensor) -> torch.Tensor:
    """(B,) float64: a position-weighted pixel sum of each view (a changed pixel changes it)."""
    if images.device.type == "mps":  # no float64 there
        images = images.cpu()
    with torch.autocast(images.device.type, enabled=False):  # the same arithmetic under any precision setting
        flat = images.detach().double().flatten(1)
        weights = torch.linspace(1.0, 2.0, flat.shape[1], dtype=torch.float64, device=flat.device)
        return flat @ weights


def cached_teacher_logits(index: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) log-probabilities from top-k: k stored, the remaining mass spread evenly.

    The loss treats them as teacher logits: argmax is the top-1 class, and softmax(logq / tau)
    is q^(1/tau) renormalised, the temperature-scaled teacher exactly among the top k.
    """
    prob = prob.float().clamp_min(1e-12)
    rest = (1.0 - prob.sum(-1, keepdim=True)).clamp_min(0.0) / max(num_classes - prob.shape[-1], 1)
    full = rest.clamp_min(1e-12).log().expand(-1, num_classes).clone()
    log_prob = prob.log()
    log_prob[:, 0] += 1e-6  # the stored top-1 stays the argmax when fp16 rounded it to a tie with the next
    return full.scatter_(1, index.long(), log_prob)
