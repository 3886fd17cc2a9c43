"""Safe loading of teacher weights from files a user was handed.

Nothing here unpickles arbitrary objects: safetensors files are read as tensors, and every
other file goes through `torch.load(weights_only=True)`, which refuses pickled code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from distill.errors import UserError

__all__ = ["read_weights_file", "extract_state_dict", "STUDENT_PREFIX"]

# Prefix of the student's timm weights in a checkpoint of this project's own runs.
STUDENT_PREFIX = "student.model."
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
ACCEPTED = "a .safetensors file, a PyTorch state dict (.pth/.pt/.bin) or a checkpoint of this project's runs (.ckpt)"


def read_weights_file(path: str | Path, option: str = "teacher.weights") -> dict[str, Any]:
    """Read a weights file without running code from it; errors name the file and what is accepted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: file '{path}' does not exist; expected {ACCEPTED}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (code or garbage), SafetensorError, EOFError...
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{option}: '{path}' is not a weights file ({first}); expected {ACCEPTED}") from err


def extract_state_dict(obj: Any, path: str | Path, option: str = "teacher.weights") -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """Return (timm state dict, this project's hyper-parameters or None) from what a file held.

    Accepts a flat state dict, a dict nesting one under a usual key (`state_dict`, `model`,
    `model_ema`, ...), and a Lightning checkpoint of this project, whose student weights sit
    under `student.model.` (a teacher trained with `configs/teacher.yaml`).
    """
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{option}: '{path}' holds no state dict of tensors; expected {ACCEPTED}")
    if any(k.startswith(STUDENT_PREFIX) for k in obj):
        obj = {k[len(STUDENT_PREFIX):]: v for k, v in obj.items() if k.startswith(STUDENT_PREFIX)}
    elif all(k.startswith("module.") for k in obj):  # saved from a DDP-wrapped model
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, hparams
