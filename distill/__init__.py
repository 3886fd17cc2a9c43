"""DeiT-style distillation of frozen CNN teachers into ViT students, on Lightning and timm.

The package imports nothing heavy at import time: `from distill import DistillationModule`
loads the module it names on first use (PEP 562), so the model-side packages (`students`,
`teachers`) can use `distill.common.errors` and `distill.common.ranges` without an import cycle.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DistillationLoss", "DistillationModule", "ImageDataModule", "UserError"]

_WHERE = {"DistillationLoss": "distill.training.losses", "DistillationModule": "distill.training.module",
          "ImageDataModule": "distill.data.datamodule", "UserError": "distill.common.errors"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
