"""Several frozen teachers as one: the ensemble's prediction is the mean of their probabilities.

`model.teacher` given a list builds a `TeacherEnsemble` of its members. Its logits are the log of the
members' mean probability, log(1/n sum_i softmax(z_i)), so that everything downstream treats it as one
teacher: its softmax is the mean probability (soft distillation; at a temperature tau the loss softens that
mean, softmax(log p / tau)), its argmax is the class of highest mean probability (hard distillation), and
`distill cache-teacher` stores its top-k as for one teacher. Each member keeps its own normalisation,
input size and precision; `forward_members` also returns each member's logits, for the per-member
validation accuracy (`val/teacher_acc_<i>` beside the ensemble's `val/teacher_acc`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from distill.common.errors import UserError
from teachers.teacher import Teacher

__all__ = ["TeacherEnsemble"]


class TeacherEnsemble(nn.Module):
    """Frozen teachers predicting the same classes; their mean probability is the teacher's prediction."""

    def __init__(self, members: list[Teacher]) -> None:
        super().__init__()
        if not members:
            raise UserError("model.teacher: an empty list; give one teacher, a list of teachers, or null")
        classes = {member.num_classes for member in members}
        if len(classes) > 1:
            found = ", ".join(f"'{m.model_name}' ({m.config['weights']}): {m.num_classes}" for m in members)
            raise UserError(f"model.teacher: the teachers of an ensemble must predict the same classes; {found}")
        self.members = nn.ModuleList(members)
        self.config = {"members": [dict(member.config) for member in members]}
        self.model_name = " + ".join(member.model_name for member in members)
        self.num_classes: int = members[0].num_classes
        self.requires_grad_(False)
        self.train(False)

    def __len__(self) -> int:
        return len(self.members)

    def set_input_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Declare the student's normalisation to every member (each re-normalises to its own)."""
        for member in self.members:
            member.set_input_normalization(mean, std)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        """Always eval, as each member is."""
        return super().train(False)

    @property
    def fast_agreement(self) -> Optional[float]:
        """The lowest fast-path agreement with fp32 among the members on a reduced precision (None until every member
        ran a batch, or when all run in fp32)."""
        if not all(member.prepared for member in self.members):
            return None
        values = [member.fast_agreement for member in self.members if member.fast_agreement is not None]
        return min(values) if values else None

    @property
    def fast_dtype(self) -> Optional[str]:
        """The members' fast-path dtypes, as one string (None when every member runs in fp32)."""
        dtypes = [member.fast_dtype for member in self.members]
        return None if all(d is None for d in dtypes) else "/".join(str(d or "fp32") for d in dtypes)

    def forward_members(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the ensemble's logits: log of the mean probability (B, C), each member's logits)."""
        logits = [member(x) for member in self.members]
        return _log_mean_probability(logits), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log(mean of the members' probabilities) (B, C), float32, for student-normalised images."""
        return self.forward_members(x)[0]

    def forward_members_with_features(self, x: torch.Tensor,
                                      levels: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the ensemble's logits, the feature maps of each member's `levels`, member after member)."""
        outputs = [member.forward_with_features(x, own) for member, own in zip(self.members, levels)]
        return _log_mean_probability([logits for logits, _ in outputs]), [f for _, features in outputs for f in features]


def _log_mean_probability(logits: list[torch.Tensor]) -> torch.Tensor:
    """log((1/n) sum_i softmax(z_i)) (B, C) of the members' logits z_i."""
    log_probs = torch.stack([z.float().log_softmax(-1) for z in logits])  # (n, B, C)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))
