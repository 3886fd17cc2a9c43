"""Feature imitation (Li et al. 2022, "Locality guidance for improving vision transformers on tiny datasets").

The student's intermediate features learn the teacher's: for each pair (student level, teacher level) of timm's
feature levels (a ViT's blocks; a convnet's stem, then its stages), a 1x1 convolution maps the student's patch tokens, laid out
on their grid, to the teacher's channels; both maps are resized (bilinear) to the larger grid and compared by mean
squared error. The pairs' errors are summed; the module adds `feature_weight` times the sum to the loss (Li et al.:
blocks 0, 6, 11 of DeiT-Ti against the three stages of a CIFAR ResNet-56, weight 2.5). The convolutions are trained
with the student and saved in checkpoints, never exported. With an ensemble each member's features are imitated, each
pair through its own convolution, and the errors averaged over the members; explicit pairs name the same teacher
level in every member (by default each member's levels are found by reduction).

Hand-written: timm returns the feature maps (`forward_intermediates`) but has no loss between two models' features.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from distill.common.errors import UserError

__all__ = ["FeatureImitation", "feature_pairs", "imitation_for"]

GUIDING_REDUCTIONS = (4, 8, 16)  # an ImageNet-style convnet's first three stages (timm ResNets' layer1-3)


class FeatureImitation(nn.Module):
    """Sum over pairs of MSE(project(student map), teacher map), averaged over the teacher's members.

    Args:
        student_channels: channels of the student's map of each pair.
        teacher_channels: channels of each member's map of each pair, member after member (len: members x pairs).
    """

    def __init__(self, student_channels: list[int], teacher_channels: list[int]) -> None:
        super().__init__()
        self.student_levels: list[int] = []  # timm feature levels of the pairs (set by `imitation_for`)
        self.teacher_levels: list[list[int]] = []  # each member's
        if not student_channels or len(teacher_channels) % len(student_channels):
            raise ValueError("FeatureImitation: every member needs a teacher level for each student level")
        self.pairs, self.members = len(student_channels), len(teacher_channels) // len(student_channels)
        self.project = nn.ModuleList(nn.Conv2d(student_channels[i % self.pairs], c, kernel_size=1)
                                     for i, c in enumerate(teacher_channels))

    def step(self, teacher: nn.Module, student_forward: Callable,
             images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(teacher logits, the student's (class, distillation) logits, the imitation loss) of a training batch; the
        teacher (one, or an ensemble) and the student (`forward_heads_and_features`) each run once."""
        teacher_logits, teacher_maps = teacher.forward_members_with_features(images, self.teacher_levels)
        cls_logits, dist_logits, student_maps = student_forward(images, self.student_levels)
        return teacher_logits, (cls_logits, dist_logits), self(student_maps, teacher_maps)

    def parameter_groups(self, student: nn.Module, weight_decay: float) -> list[dict]:
        """The optimiser's groups: the student's by timm's rules (no decay on 1-d parameters and its
        `no_weight_decay()`), then the projections'."""
        no_decay = getattr(student, "no_weight_decay", lambda: set())()
        return [*param_groups_weight_decay(student, weight_decay, no_weight_decay_list=no_decay),
                *param_groups_weight_decay(self, weight_decay)]

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = student[0].new_zeros((), dtype=torch.float32)
        for index, (project, target) in enumerate(zip(self.project, teacher)):
            mapped = project(student[index % self.pairs]).float()
            size = (max(mapped.shape[-2], target.shape[-2]), max(mapped.shape[-1], target.shape[-1]))
            if tuple(mapped.shape[-2:]) != size:
                mapped = F.interpolate(mapped, size=size, mode="bilinear", align_corners=False)
            if tuple(target.shape[-2:]) != size:
                target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
            total = total + F.mse_loss(mapped, target)
        return total / self.members


def imitation_for(student: nn.Module, teacher: Optional[nn.Module], weight: float,
                  pairs: Optional[list[tuple[int, int]]], teacher_cache: Optional[str]) -> Optional[FeatureImitation]:
    """The feature imitation of `model.feature_weight` / `model.feature_pairs` (None when the weight is 0)."""
    if not weight:
        if pairs is not None:
            raise UserError("model.feature_pairs is set but model.feature_weight is 0 (imitation off); set a weight "
                            "(Li et al.: 2.5) or drop the pairs")
        return None
    if teacher_cache:
        raise UserError("model.feature_weight: a teacher cache holds the teacher's top-k outputs, not its features; "
                        "imitate features with a live teacher (no data.teacher_cache), or set model.feature_weight: 0")
    if teacher is None:
        raise UserError("model.feature_weight: feature imitation needs a model.teacher; set one, or "
                        "model.feature_weight: 0 to train without it")
    members = list(teacher.members)
    student_info = list(getattr(student, "feature_info", None) or [])
    student_levels, teacher_levels = feature_pairs(student_info, [m.feature_info for m in members], pairs)
    channels = [member.feature_info[level]["num_chs"] for member, own in zip(members, teacher_levels) for level in own]
    imitation = FeatureImitation([student_info[level]["num_chs"] for level in student_levels], channels)
    imitation.student_levels, imitation.teacher_levels = student_levels, teacher_levels
    return imitation


def feature_pairs(student_info: list[dict], members_info: list[list[dict]],
                  pairs: Optional[list[tuple[int, int]]]) -> tuple[list[int], list[list[int]]]:
    """(student levels, each member's teacher levels) of `model.feature_pairs`; None: the student's first, middle
    and last levels against the teacher's levels of reduction 4, 8 and 16 (its first three stages)."""
    if not student_info:
        raise UserError("model.feature_weight: the student has no timm feature levels (feature_info) to imitate with")
    if pairs is None:
        depth = len(student_info)
        student = [0, depth // 2, depth - 1] if depth >= 3 else list(range(depth))
        teacher = []
        for info in members_info:
            reductions = [level.get("reduction") for level in info]
            own = [reductions.index(r) for r in GUIDING_REDUCTIONS[:len(student)] if r in reductions]
            if len(own) != len(student):
                raise UserError(f"model.feature_pairs: the teacher has no feature levels of reduction "
                                f"{', '.join(map(str, GUIDING_REDUCTIONS[:len(student)]))} to pair by default (its "
                                f"levels' reductions: {reductions}); give the pairs, e.g. [[0, 1], [3, 2]] (student "
                                "level, teacher level), or turn feature imitation off with model.feature_weight: 0")
            teacher.append(own)
        return student, teacher
    if not pairs:
        raise UserError("model.feature_pairs: give at least one [student level, teacher level] pair, or null for the "
                        "default pairs")
    for s, t in pairs:
        if not 0 <= s < len(student_info):
            raise UserError(f"model.feature_pairs: student level {s} does not exist (the student has "
                            f"{len(student_info)} feature levels: 0..{len(student_info) - 1})")
        for index, info in enumerate(members_info):
            if not 0 <= t < len(info):
                member = f"teacher {index} of the ensemble" if len(members_info) > 1 else "the teacher"
                raise UserError(f"model.feature_pairs: teacher level {t} does not exist ({member} has {len(info)} "
                                f"feature levels: 0..{len(info) - 1})")
    return [s for s, _ in pairs], [[t for _, t in pairs] for _ in members_info]
