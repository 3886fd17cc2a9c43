"""No teacher: the distillation head learns the labels too, so the averaged output is never half an untrained head
(the reference DeiT code's pitfall: its `head_dist` gets no gradient but is averaged in at evaluation)."""
from __future__ import annotations

from typing import ClassVar

from distill.training.methods.base import LogitMethod

__all__ = ["NoTeacher"]


class NoTeacher(LogitMethod):
    """No teacher (`none`): no teacher runs and no teacher term exists.

    `DistillationLoss` trains the distillation head on the labels with the class head's loss."""

    name: ClassVar[str] = "none"
    order: ClassVar[int] = 0
    needs_teacher: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(standardize=False)

    def terms(self, student, teacher, target):  # noqa: ANN001, ANN201 - never called: the loss handles `none`
        raise RuntimeError("`none` has no teacher term: DistillationLoss trains the distillation head on the labels")

    def options(self) -> dict[str, object]:
        return {}
