"""An export folder for inference: the model as timm loads it, its preprocessing, its class names, top-k.

One place for what `predict`, `serve` and `export --int8` must do alike, so that they can
never disagree on how an image becomes a prediction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from distill.errors import UserError

__all__ = ["load_export", "export_transform", "label_names", "best_classes"]


def load_export(folder: str | Path, option: str = "--export") -> nn.Module:
    """The exported student as timm loads it, in eval mode; a folder that is not a whole export is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option}: '{folder}' is not a folder; give the folder distill export wrote")
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{option}: '{folder}' has no {' or '.join(missing)}; it is not a (whole) export folder: "
                        "run distill export again")
    try:
        return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    except Exception as err:  # noqa: BLE001 - a truncated or edited file fails in many ways inside timm/safetensors
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{option}: '{folder}' could not be loaded ({type(err).__name__}: {first}); its files are "
                        "damaged: run distill export again") from err


def export_transform(model: torch.nn.Module) -> Callable[[Any], torch.Tensor]:
    """The evaluation preprocessing recorded in an export's config.json (used by predict and serve alike)."""
    return create_transform(**resolve_data_config({}, model=model))


def label_names(model: torch.nn.Module) -> list[str]:
    """The class names an export carries (its class indices as text if it has none)."""
    return model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]


def best_classes(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Probabilities and class indices of the `k` best classes of each row, best first."""
    probs, indices = logits.float().softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return probs.tolist(), indices.tolist()
