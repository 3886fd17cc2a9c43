"""What every distillation method is: `LogitMethod`, and logit standardisation (Sun et al., CVPR 2024)."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

__all__ = ["LogitMethod", "standardized", "target_classes"]


class LogitMethod(nn.Module):
    """A distillation method on the distillation head's logits and the teacher's (B, C each).

    Subclasses set `name` (how configs and `distill compare --types` call it) and `order` (its place in the
    table), take their options as typed constructor arguments, and implement `terms`, returning their unweighted
    terms by name; `weights(epoch)` gives each term's factor (1 by default). `needs_teacher`: False only for
    `none`. `needs_full_distribution`: the method reads every class's teacher probability, which a teacher cache
    (top-k, the rest of the mass spread evenly) does not hold unless its k is the number of classes.

    Args:
        standardize: z-score each logit vector (teacher's and student's) over the classes before the softmax
            (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation"): the student matches the
            teacher's logit relations, not their scale.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    needs_teacher: ClassVar[bool] = True
    needs_full_distribution: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["LogitMethod"]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")  # its own name: a subclass that names none does not take its parent's
        if name:
            if name in LogitMethod.registry and LogitMethod.registry[name].__qualname__ != cls.__qualname__:
                raise TypeError(f"two distillation methods are named '{name}': {LogitMethod.registry[name]} and {cls}")
            LogitMethod.registry[name] = cls

    standardizes_student: ClassVar[bool] = True  # False where only the teacher's logits are z-scored (hard)

    def __init__(self, standardize: bool = False) -> None:
        super().__init__()
        self.standardize = standardize

    @property
    def reads_every_class(self) -> bool:
        """Whether the method needs every class's teacher logit: a top-k cache spreads the rest evenly, which changes
        a distribution's tail and so a z-scored row's mean and spread too (`standardize`)."""
        return self.needs_full_distribution or self.standardize

    def forward(self, student: torch.Tensor, teacher: Optional[torch.Tensor], target: torch.Tensor,
                epoch: float = 0.0) -> dict[str, torch.Tensor]:
        """The method's unweighted terms by name. `target`: (B,) class indices or (B, C) mixed soft targets."""
        student, teacher = _at_least_fp32(student), None if teacher is None else _at_least_fp32(teacher)
        if self.standardize and teacher is not None:
            student = standardized(student) if self.standardizes_student else student
            teacher = standardized(teacher)
        return self.terms(student, teacher, target)

    def terms(self, student: torch.Tensor, teacher: Optional[torch.Tensor],
              target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weights(self, epoch: float = 0.0) -> dict[str, float]:
        """Each term's factor in the total (before the loss's alpha); 1 for a term not named here."""
        return {}

    def options(self) -> dict[str, object]:
        """The constructor's options as given (what a checkpoint records to rebuild the method)."""
        return {"standardize": self.standardize}


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits (autocast) in fp32 for the softmax and logs; fp64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def standardized(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row z-scored over the classes: (z - mean) / std (the population std, as Sun et al. define it)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def target_classes(target: torch.Tensor) -> torch.Tensor:
    """Each sample's class: itself for (B,) labels; for mixup/cutmix soft targets (B, C) the class holding the most
    mass (the larger of the two mixed images' labels, label smoothing left out). DKD splits the teacher's and the
    student's distributions at this class."""
    return target.argmax(dim=-1) if target.ndim == 2 else target
