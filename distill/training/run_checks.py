"""The checks a distillation module makes when it is built, before any training: classes, teacher or cache,
the method against the cache, the optimiser."""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Optional

from timm.optim import get_optimizer_class, list_optimizers
from torch import nn

from distill.cache.format import TeacherCache
from distill.common.console import say
from distill.common.errors import UserError
from teachers import Teacher

__all__ = ["check_cache_holds", "check_classes", "check_optimizer", "teacher_beside_cache"]


def check_classes(student: nn.Module, teacher: Optional[Teacher], num_classes: int, distillation: str,
                   teacher_cache: Optional[str] = None) -> None:
    """Class-count and teacher presence checks, before any training starts."""
    if distillation != "none" and teacher is None and not teacher_cache:
        raise UserError(f"model.distillation is '{distillation}' but no model.teacher (or data.teacher_cache) is set; "
                         "set one or use 'none'")
    student_classes = getattr(student, "num_classes", num_classes)
    if student_classes != num_classes:
        raise UserError(f"student predicts {student_classes} classes but the dataset has {num_classes}")
    if teacher is not None and teacher.num_classes != num_classes:
        raise UserError(
            f"teacher '{teacher.model_name}' predicts {teacher.num_classes} classes but the dataset has "
            f"{num_classes}; train or fine-tune a teacher on these classes first (see configs/teacher.yaml)"
        )



def check_cache_holds(method: Any, teacher_cache: Optional[str], num_classes: int) -> None:
    """A method that reads every class's teacher probability (DKD, DIST) trains from a teacher cache only if the
    cache holds every class (its top-k is the number of classes); the rest of the mass is otherwise spread evenly."""
    if not teacher_cache or not method.reads_every_class:
        return
    top_k = TeacherCache.read_meta(Path(teacher_cache))["top_k"]
    if top_k < num_classes:
        standardized = not method.needs_full_distribution  # reads every class only through its z-score
        what = "with standardize (z-scored logits) " if standardized else ""
        instead = ("leave standardize off" if standardized else "use soft or hard, which a top-k cache serves")
        raise UserError(f"model.distillation '{method.name}' {what}reads every class's teacher probability, but "
                        f"data.teacher_cache '{teacher_cache}' holds the top {top_k} of {num_classes} (the rest spread "
                        f"evenly); build the cache with --top_k {num_classes}, train with the live teacher, or "
                        f"{instead}")



def check_optimizer(optimizer: str, fused: bool) -> None:
    """`model.optimizer` is a timm optimiser (with a close match if not); `model.fused_optimizer` needs its kernel."""
    if optimizer.lower() not in list_optimizers():
        close = difflib.get_close_matches(optimizer.lower(), list_optimizers(), n=3)
        raise UserError(f"model.optimizer: '{optimizer}' is not a timm optimiser"
                        f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} (DeiT: adamw)")
    if fused and "fused" not in inspect.signature(get_optimizer_class(optimizer.lower())).parameters:
        raise UserError(f"model.fused_optimizer: '{optimizer}' has no fused kernel (torch's adamw, adam, sgd have "
                        "one); set model.fused_optimizer: false")



def teacher_beside_cache(teacher: Optional[nn.Module], cache: Optional[str], verify: float) -> Optional[nn.Module]:
    """The teacher a run keeps: none beside a teacher cache unless it verifies the cache (`teacher_cache_verify`)."""
    assert 0.0 <= verify <= 1.0, verify  # ClosedUnitInterval on the command line
    if cache and verify > 0 and teacher is None:
        raise UserError("model.teacher_cache_verify needs model.teacher (the teacher the cache was built with)")
    if cache and verify == 0 and teacher is not None:
        say("model.teacher is not kept: data.teacher_cache replaces it "
            "(set model.teacher_cache_verify to check the cache against it)")
        return None
    return teacher
