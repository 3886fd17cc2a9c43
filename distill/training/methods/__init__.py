"""The distillation methods: one class in one file of this folder, found by its `name` (the table below is
built from the folder, so a new method is one new file and its test).

    none   no teacher: both heads learn the labels                                  none.py
    soft   Hinton et al. 2015: KL at a temperature                                  soft.py
    hard   DeiT (Touvron et al. 2021): cross-entropy against the teacher's argmax    hard.py
    dkd    Zhao et al., CVPR 2022: target and non-target KL, weighted apart          dkd.py
    dist   Huang et al., NeurIPS 2022: inter- and intra-class Pearson correlation    dist.py

Each is a `LogitMethod` (base.py): typed options in its constructor (so `--print_config` and `--help`
show them with their ranges), a `forward(student_logits, teacher_logits, target, epoch)` that returns its
named terms, and `weights(epoch)`, their factors; `DistillationLoss` (distill/training/losses.py) writes
the total once. Every logit method takes `standardize` (Sun et al., CVPR 2024: z-score each logit vector
before the softmax). In a config, `model.distillation` is a name of this table or a `class_path` with
`init_args`.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Literal

from distill.training.methods.base import LogitMethod, standardized

__all__ = ["LogitMethod", "METHODS", "MethodName", "method_names", "needs_teacher", "standardized"]

for _module in pkgutil.iter_modules(__path__):  # every file of the folder: its class registers itself by name
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS: dict[str, type[LogitMethod]] = dict(sorted(LogitMethod.registry.items(), key=lambda item: item[1].order))


def method_names() -> tuple[str, ...]:
    """The names `model.distillation` and `distill compare --types` accept, in the table's order."""
    return tuple(METHODS)


MethodName = Literal[method_names()]  # type: ignore[valid-type] - the table's names, for jsonargparse


def needs_teacher(method: object) -> bool:
    """Whether `model.distillation` as configured (a name, a method, or its class_path and init_args before they are
    instantiated) runs a teacher: False only for `none`, which builds no teacher at all."""
    if isinstance(method, str):
        return method not in METHODS or METHODS[method].needs_teacher
    if isinstance(method, LogitMethod):
        return method.needs_teacher
    path = method.get("class_path") if hasattr(method, "get") else None
    found = next((cls for cls in METHODS.values() if path in (f"{cls.__module__}.{cls.__qualname__}", cls.__name__)),
                 None)
    return found is None or found.needs_teacher
