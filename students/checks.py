"""The student sizes timm accepts, refused in one line when the student is built (before any training).

timm checks some combinations with a bare `assert` while it builds a model (a hybrid ViT whose
convolutional stem leaves a feature map its patch size does not divide, a width its heads do not
divide, a window list of the wrong length), trips over others (one `num_heads` for Swin's stages)
and accepts some it fails on in the first forward (a plain ViT's image size not divisible by its
patch size). Each constraint is read from the model, not from a table: the stem's reduction by
running it on zeros, a stage's from `feature_info`, the width and heads from the blocks. The
messages name the options (`data.img_size`, `model.student.init_args.*`) and the nearest values
that work.
"""
from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from distill.common.errors import UserError

__all__ = ["check_built", "check_options", "explain_build_error"]

IMG_SIZE = "data.img_size"
OPTION = "model.student.init_args."
ARCH_OPTIONS = ("patch_size", "embed_dim", "depth", "num_heads", "depths", "window_size")
RELAXED = ("embed_dim", "num_heads", "window_size")  # left to the architecture in the reference probe


def check_options(model_name: str, arch: dict[str, Any]) -> None:
    """Before building: the combinations the options alone decide (width and heads, one entry per stage)."""
    embed_dim, num_heads = arch.get("embed_dim"), arch.get("num_heads")
    if isinstance(embed_dim, int) and isinstance(num_heads, int) and embed_dim % num_heads:
        raise _heads_refusal(model_name, embed_dim, num_heads, width_set=True)
    depths = arch.get("depths")
    for key in ("num_heads", "window_size"):
        value = arch.get(key)
        if isinstance(depths, (list, tuple)) and isinstance(value, (list, tuple)) and len(value) != len(depths):
            raise UserError(f"student '{model_name}': {OPTION}{key} {list(value)} has {len(value)} entries for the "
                            f"{len(depths)} stages of {OPTION}depths {list(depths)}; give one per stage")


def check_built(model: nn.Module, model_name: str, img_size: Optional[int], window_size: Any = None) -> None:
    """After building: the image size against the patch grid and, for Swin, every stage's attention window."""
    _check_patch_grid(model, model_name)
    _check_windows(model, model_name, img_size, window_size)


def explain_build_error(err: Exception, model_name: str, img_size: Optional[int], kwargs: dict[str, Any],
                        build: Callable[..., nn.Module]) -> Exception:
    """The one-line UserError behind an error timm raised building the student, or `err` itself (a bug).

    `build(**kwargs)` builds the model as the student does; probes with one constraint relaxed
    (HybridEmbed's grid assert off, the heads or windows left to the architecture) find which
    option broke it. A timm assert nothing here explains is still refused in one line, with its text.
    """
    probe_kwargs = {**kwargs, "pretrained": False}
    arch = {key: kwargs[key] for key in ARCH_OPTIONS if kwargs.get(key) is not None}
    try:
        grid_probe = _try(build, **probe_kwargs, dynamic_img_pad=True)  # a ViT without the stem's grid assert
        if grid_probe is not None:
            _check_patch_grid(grid_probe, model_name)
        # width, heads and windows left to the architecture: its stages, width and heads to compare with
        reference_kwargs = {k: v for k, v in probe_kwargs.items() if k not in RELAXED}
        reference = _try(build, **reference_kwargs, dynamic_img_pad=True) or _try(build, **reference_kwargs)
        if reference is not None:
            _check_against(reference, model_name, arch)
    except UserError as refusal:
        return refusal
    if not isinstance(err, AssertionError):
        return err
    frames = traceback.extract_tb(err.__traceback__)  # a bare assert's own line says what it checks
    text = str(err).strip() or (f"{frames[-1].line} ({Path(frames[-1].filename).name}:{frames[-1].lineno})"
                                if frames else "an assertion failed")
    options = ", ".join(f"{OPTION}{key} {value}" for key, value in arch.items())
    return UserError(f"student '{model_name}': timm refuses {options or 'its defaults'} at {IMG_SIZE} {img_size}: "
                     f"{text}")


def _try(build: Callable[..., nn.Module], **kwargs: Any) -> Optional[nn.Module]:
    """A probe model, or None where these options fail too."""
    try:
        return build(**kwargs)
    except Exception:  # any failure only means this probe cannot tell
        return None


def _check_against(reference: nn.Module, model_name: str, arch: dict[str, Any]) -> None:
    """The options against a model the architecture builds without them: stage count, width, heads."""
    num_heads, window_size = arch.get("num_heads"), arch.get("window_size")
    blocks = getattr(reference, "blocks", None)  # a flat stack (ViT); stages otherwise (Swin)
    if blocks is None:
        stages = len(getattr(reference, "feature_info", []))
        if isinstance(num_heads, int):
            example = [num_heads * 2 ** i for i in range(stages)]
            raise UserError(f"student '{model_name}': {OPTION}num_heads {num_heads} is one number, but the student "
                            f"has {stages} stages and takes one per stage, e.g. {example}")
        for key, value in (("num_heads", num_heads), ("window_size", window_size)):
            if isinstance(value, (list, tuple)) and len(value) != stages:
                raise UserError(f"student '{model_name}': {OPTION}{key} {list(value)} has {len(value)} entries for "
                                f"its {stages} stages; give one per stage (or set {OPTION}depths)")
        return
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if len(blocks) else None
    if isinstance(num_heads, (list, tuple)):
        raise UserError(f"student '{model_name}': {OPTION}num_heads {list(num_heads)} is one number per stage, "
                        f"but the student is one stack of blocks and takes one number, e.g. {heads or num_heads[0]}")
    width = arch.get("embed_dim") or getattr(reference, "embed_dim", None)
    heads = num_heads or heads
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise _heads_refusal(model_name, width, heads, "embed_dim" in arch, num_heads is not None)


def _heads_refusal(model_name: str, width: int, heads: int, width_set: bool, heads_set: bool = True) -> UserError:
    """The width must split into equal heads: widths near the one set for these heads, or heads that divide it."""
    named = {key: f"{OPTION}{key} {value}" if is_set else f"the architecture's {key} {value} ({OPTION}{key})"
             for key, value, is_set in (("embed_dim", width, width_set), ("num_heads", heads, heads_set))}
    if width_set:
        accepted = f"embed_dim must be a multiple of num_heads = {heads}: {_multiples_near(width, heads)}"
    else:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        near = [max(d for d in divisors if d < heads), *[d for d in divisors if d > heads][:1]]
        accepted = f"num_heads must divide {width}: {' or '.join(map(str, near))}"
    return UserError(f"student '{model_name}': {named['embed_dim']} is not divisible by {named['num_heads']}; "
                     f"{accepted}")


def _check_patch_grid(model: nn.Module, model_name: str) -> None:
    """The patch size must divide the image (plain ViT, Swin) or the stem's feature map (hybrid ViT)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "img_size", None) is None:
        return
    img, patch = patch_embed.img_size[0], patch_embed.patch_size[0]
    options = f"{IMG_SIZE} {img}, {OPTION}patch_size {patch}"
    if getattr(patch_embed, "backbone", None) is None:
        if img % patch:
            raise UserError(f"student '{model_name}': image size {img} is not divisible by patch size {patch} "
                            f"({options}); img_size must be a multiple of {patch}: {_multiples_near(img, patch)}")
        return
    feature = patch_embed.feature_size[0]  # HybridEmbed ran its backbone on zeros of the image size
    if feature % patch:
        reduction = _stem_reduction(model, patch_embed)
        raise UserError(f"student '{model_name}': image size {img} is not divisible by stem reduction x patch size "
                        f"({options}): the convolutional stem gives a {feature}x{feature} feature map, not a multiple "
                        f"of {patch}; img_size must be a multiple of stem reduction x patch_size = {reduction} x "
                        f"{patch} = {reduction * patch}: {_multiples_near(img, reduction * patch)}")


def _stem_reduction(model: nn.Module, patch_embed: nn.Module) -> int:
    """How many times a hybrid's backbone shrinks the image: run on zeros at the architecture's own input size."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    backbone, training = patch_embed.backbone, patch_embed.backbone.training
    with torch.no_grad():
        features = backbone.eval()(torch.zeros(1, patch_embed.in_chans, size, size))  # (1, C, size / r, size / r)
    backbone.train(training)
    features = features[-1] if isinstance(features, (list, tuple)) else features
    return size // features.shape[-1]


def _check_windows(model: nn.Module, model_name: str, img_size: Optional[int], window_size: Any) -> None:
    """Swin-style models: every stage's patch grid must be a multiple of its attention window."""
    stages = getattr(model, "layers", None)
    info = getattr(model, "feature_info", None)
    if img_size is None or stages is None or not info:
        return
    windows = _stage_windows(stages, window_size)
    reductions = [stage_info["reduction"] for stage_info in info]
    for index, (window, reduction) in enumerate(zip(windows, reductions)):
        grid = img_size // reduction
        if window and grid > window and grid % window:
            size = math.lcm(*(r * w for r, w in zip(reductions, windows) if w))
            raise UserError(
                f"student '{model_name}': at image size {img_size} stage {index} has a {grid}x{grid} patch grid, "
                f"not a multiple of its window {window}; use an image size that is a multiple of {size} "
                f"({IMG_SIZE}): {_multiples_near(img_size, size)}; or another {OPTION}window_size"
            )


def _stage_windows(stages: nn.Module, window_size: Any) -> list[Optional[int]]:
    """Each stage's window as configured (timm shrinks a window to a grid smaller than it), None without one."""
    if isinstance(window_size, (list, tuple)):
        return [int(w[0] if isinstance(w, (list, tuple)) else w) for w in window_size]
    windows = []
    for stage in stages:
        blocks = getattr(stage, "blocks", [])
        window = getattr(blocks[0], "window_size", None) if len(blocks) else None
        window = window_size or window
        windows.append(None if window is None else int(window if isinstance(window, int) else window[0]))
    return windows


def _multiples_near(value: int, step: int) -> str:
    """The multiples of `step` nearest `value`: one below (if any) and those above, e.g. '24, 32, 40, ...'."""
    below = value // step * step
    above = [below + step * i for i in (1, 2, 3)]
    return ", ".join(map(str, ([below] if below else []) + above[:2 if below else 3])) + ", ..."
