"""Mixup and cutmix of fixed pairs, after the batch reaches the device.

timm's `Mixup` draws (mixup or cutmix, lambda, box) are taken per pair and seeded by the pair's view keys
(`mixing_params`, on the host, before the batch moves), so the mixed image does not depend on the batch size or
the number of processes and a teacher cache replays it; `apply_mixing` mixes on whatever device the images are,
pair by pair on the CPU (a pair's two images stay in cache), all pairs at once on an accelerator: the same bits.
"""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, one_hot

from distill.common.adapters import mixup_draw
from distill.common.seeding import sample_seed

__all__ = ["apply_mixing", "mixing_params"]


def mixing_params(keys: torch.Tensor, mixup: Mixup, image_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-sample mixup/cutmix parameters (B, 6: lam, cutmix, y0, y1, x0, x1) of a batch of pairs.

    Rows 2j and 2j+1 are a fixed pair (`EpochSampler(pairs=True)`); the pair's draws come from
    timm's `Mixup` (its distributions and options) under a seed of (seed, the pair's keys).
    """
    rows = keys.tolist()
    params = [[1.0, 0.0, 0, 0, 0, 0]] * len(rows)
    state = np.random.get_state()  # timm draws from numpy's global generator only; seeded per pair, restored after
    try:
        for j in range(0, len(rows) - 1, 2):
            (epoch, first, repeat), second = rows[j], rows[j + 1][1]
            np.random.seed(sample_seed(seed, epoch, first, second, repeat, 3))
            lam, use_cutmix = mixup_draw(mixup)
            box = (0, 0, 0, 0)
            if use_cutmix and lam != 1.0:
                box, lam = cutmix_bbox_and_lam(image_shape, lam, ratio_minmax=mixup.cutmix_minmax,
                                               correct_lam=mixup.correct_lam)
            params[j] = params[j + 1] = [lam, float(use_cutmix), *box]
    finally:
        np.random.set_state(state)
    return torch.tensor(params, dtype=torch.float32)  # not float64: some devices (MPS) have none


def apply_mixing(images: torch.Tensor, targets: torch.Tensor, params: torch.Tensor, mixup: Mixup
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with its pair partner (rows 2j <-> 2j+1) as `params` say; soft targets (B, C).

    timm's blend (`lam * x + (1 - lam) * partner`; cutmix pastes the partner's box) per pair, on
    the batch's images in place, as timm's `Mixup` does. Targets are timm's smoothed one-hot,
    mixed by lam. `params` is best left on the host (the data module keeps it there): the boxes are
    sliced there, and a copy back from the device would wait for it.
    """
    rows = params.cpu()  # a few numbers
    _mix_pairs(images, rows)
    off = mixup.label_smoothing / mixup.num_classes
    smoothed = one_hot(targets, mixup.num_classes, on_value=1.0 - mixup.label_smoothing + off, off_value=off)
    lam = rows[:, 0].to(smoothed.device, smoothed.dtype, non_blocking=True).view(-1, 1)  # queued, not waited for
    partner = torch.arange(len(targets), device=targets.device) ^ 1  # 0<->1, 2<->3, ...
    return images, smoothed * lam + smoothed[partner] * (1 - lam)


def _mix_pairs(images: torch.Tensor, params: torch.Tensor) -> None:
    """In place: each pair blended (`x * lam + partner * (1 - lam)` in float32, timm's arithmetic, not
    `lerp`: runs keep the pixels they had) or its cutmix box swapped. On the CPU pair by pair (a pair's
    two images stay in the cache: 3x faster than whole-batch passes there); elsewhere all pairs at
    once, boxes included (a loop would launch kernels by the hundred per batch on a GPU). Both give the
    same bits."""
    if images.device.type == "cpu":
        _mix_each_pair(images, params)
    else:
        _mix_all_pairs(images, params)


def _mix_each_pair(images: torch.Tensor, params: torch.Tensor) -> None:
    for j, (lam, cutmix, y0, y1, x0, x1) in enumerate(params[::2].tolist()):
        first, second = images[2 * j], images[2 * j + 1]
        if cutmix > 0:
            box = (slice(None), slice(int(y0), int(y1)), slice(int(x0), int(x1)))
            pasted = second[box].clone()
            second[box] = first[box]
            first[box] = pasted
        elif lam != 1.0:
            weight = torch.tensor(lam, dtype=images.dtype)  # the batched path's float32 weight
            blended = first * weight + second * (1 - weight)
            second.mul_(weight).add_(first * (1 - weight))
            first.copy_(blended)


def _mix_all_pairs(images: torch.Tensor, params: torch.Tensor) -> None:
    """Every pair in a few whole-batch kernels: the blend, then each cutmix box as a mask (selection: exact bits)."""
    lam, cutmix = params[:, 0], params[:, 1] > 0
    weight = torch.where(cutmix, torch.ones_like(lam), lam)  # cutmix pairs keep their pixels here
    weight = weight.to(images.device, images.dtype, non_blocking=True).view(-1, 2, 1, 1, 1)
    pairs = images.unflatten(0, (-1, 2))  # (P, 2, 3, H, W)
    first, second = pairs[:, 0], pairs[:, 1]
    original = first.clone()
    first.mul_(weight[:, 0]).add_(second * (1 - weight[:, 0]))
    second.mul_(weight[:, 1]).add_(original * (1 - weight[:, 1]))
    if not bool(cutmix.any()):  # a host tensor: no wait
        return
    boxes = params[::2, 2:6].to(torch.int64).to(images.device, non_blocking=True)  # (P, 4): y0, y1, x0, x1
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    inside_y = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])  # (P, H); empty for mixup pairs (box 0, 0, 0, 0)
    inside_x = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])  # (P, W)
    box = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (P, 1, H, W)
    pasted = torch.where(box, second, first)
    second.copy_(torch.where(box, original, second))
    first.copy_(pasted)
