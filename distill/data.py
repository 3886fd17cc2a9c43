"""Data for distillation: an ImageFolder tree (ImageNet layout) or the bundled digits set.

Transforms are timm's (`create_transform`: RandomResizedCrop, flip, RandAugment, random
erasing; resize + centre crop for evaluation). Mixup/cutmix (timm `Mixup`'s draws) mixes
fixed pairs of images after the batch reaches the device, so the teacher labels exactly the
mixed image the student sees; each pair's draws are seeded by the pair, so the mixed image
does not depend on the batch size or the number of processes (a teacher cache replays it).

Training views are a function of (seed, epoch, sample index) only: `EpochSampler` shuffles
by (seed, epoch) and hands each index to the dataset together with its epoch, and
`SeededViews` seeds every random number generator the transform uses from those three
numbers. The same view comes back whatever the number of workers, processes or restarts,
which is what makes a resumed run equal an uninterrupted one (and lets a teacher's outputs
be replayed later). Torch's DataLoader and Lightning give no such guarantee: worker seeds
depend on the worker count, and a resumed run re-seeds differently.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.mixup import cutmix_bbox_and_lam, one_hot
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder

from distill.adapters import batches_done_this_epoch, mixup_draw
from distill.batch import TrainingBatch
from distill.cache import TeacherCache
from distill.errors import UserError
from distill.hf_data import HFImageDataset, is_hf_dataset, load_hf_splits
from distill.images import (
    IMG_EXTENSIONS,
    SkipsUnreadable,
    display_name,
    find_classes,
    is_image_file,
    left_out,
    list_images,
    load_image,
)
from distill.ranges import (
    ClosedUnitInterval,
    HalfOpenUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalOpenAtZero,
    plain,
)
from distill.seeding import global_seed, sample_seed, seeded

__all__ = ["ImageDataModule", "DigitsDataset", "DIGITS", "EpochSampler", "SeededViews"]

DIGITS = "digits"


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes) as RGB PIL images.

    The split is fixed (stratified, 20% validation, seed 0: 1437 train / 360 val) so that
    every run and every stage is measured on the same images. Images are upscaled once to
    `img_size` (bicubic); the random transforms then work at that size.
    """

    def __init__(self, split: str, img_size: int, transform: Optional[Any] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=0)
        chosen = train_idx if split == "train" else val_idx
        pixels = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        self.images = [Image.fromarray(p).convert("RGB").resize((img_size, img_size), Image.BICUBIC) for p in pixels]
        self.targets = digits.target[chosen].tolist()
        self.classes = [str(c) for c in digits.target_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


class EpochSampler(DistributedSampler):
    """Shuffles by (seed, epoch), gives each rank its share, and yields `(epoch, index)` keys.

    A `DistributedSampler` (Lightning leaves those in place under DDP and calls `set_epoch`)
    that also passes the epoch to the dataset, so that `SeededViews` can seed each view from
    (seed, epoch, index) even inside persistent workers. `resume(epoch, samples)` skips the
    samples already trained on when a run restarts from a mid-epoch checkpoint.

    `num_repeats > 1` is DeiT's repeated augmentation (its `RASampler`): each index of the
    shuffled epoch appears `num_repeats` times in a row, so consecutive copies land on
    consecutive ranks (each rank sees its own augmented view, `(epoch, index, repeat)`), and
    each rank keeps `len(dataset) // num_replicas` samples, so an epoch stays one dataset
    long. (The reference also rounds that down to a multiple of 256 images; not done here.)

    `pairs=True` (mixup/cutmix on): the shuffled epoch is cut into fixed pairs (TinyViT's
    fixed mixing partners) and a pair is never split between ranks or batches (batches are
    even), so a mixed image depends on (seed, epoch, pair) only, not on the batch size or the
    number of processes. That is what lets a teacher cache replay it exactly.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
        num_repeats: int = 1, pairs: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        if num_repeats < 1:
            raise UserError(f"data.repeated_aug must be 1 (off) or more, got {num_repeats}")
        self.num_repeats, self.width = num_repeats, 2 if pairs else 1
        units = len(dataset) // self.width * num_repeats  # type: ignore[arg-type]
        if num_repeats > 1:  # an epoch stays one dataset long
            self.num_samples = len(dataset) // num_replicas // self.width * self.width  # type: ignore[arg-type]
        else:  # every unit, padded so that each rank gets as many
            self.num_samples = -(-units // num_replicas) * self.width
        self._resume_at: tuple[int, int] = (-1, 0)

    def resume(self, epoch: int, samples: int) -> None:
        """On the next pass over `epoch`, skip its first `samples` samples (already trained on)."""
        self._resume_at = (epoch, samples)

    def units(self, epoch: int) -> list[tuple[int, ...]]:
        """The epoch's units in order: one key, or the two keys of a mixing pair."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:  # DistributedSampler's own order: randperm seeded by seed + epoch
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(size))
        groups = [order[i:i + self.width] for i in range(0, size - size % self.width, self.width)]
        if self.num_repeats == 1:
            return [tuple((epoch, index) for index in group) for group in groups]
        return [tuple((epoch, index, repeat) for index in group) for group in groups for repeat in range(self.num_repeats)]

    def __iter__(self) -> Iterator[tuple[int, ...]]:  # type: ignore[override]
        epoch = self.epoch
        units = self.units(epoch)
        total = -(-len(units) // self.num_replicas) * self.num_replicas
        units += units[: total - len(units)]  # pad so that every rank gets as many
        keys = [key for unit in units[self.rank:total:self.num_replicas] for key in unit][: self.num_samples]
        if self._resume_at[0] == epoch:
            keys = keys[self._resume_at[1]:]
        self._resume_at = (-1, 0)
        return iter(keys)


class SeededViews(Dataset):
    """A training set whose item `(epoch, index)` is the view seeded by (seed, epoch, index).

    Every random draw of the transform (crop, flip, RandAugment, random erasing) comes from
    generators seeded for that sample, so the view is the same in any worker, process or
    restart. Item `(epoch, index, repeat)` is another view of the same image (repeated
    augmentation). An item is a dict of the fields of `distill.batch.TrainingBatch` for one view
    (`TrainingBatch.collate` makes the batch): `image`, `target`, the `key` (epoch, index, repeat)
    that mixup and the teacher cache use, the view's `seed`, and with a `cache`, the teacher's
    cached top-k for that view (`teacher_index`, `teacher_prob`, `checksum`). Plain integer
    indices pass through unseeded.
    """

    def __init__(self, dataset: Dataset, seed: int, cache: Optional[Any] = None) -> None:
        self.dataset, self.seed, self.cache = dataset, seed, cache

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        seed = sample_seed(self.seed, *key)  # key: (epoch, index) or (epoch, index, repeat)
        with seeded(seed):
            image, target = self.dataset[key[1]]
        full_key = (*key, 0) if len(key) == 2 else key
        view = {"image": image, "target": target, "key": torch.tensor(full_key, dtype=torch.int64),
                "seed": torch.tensor(seed, dtype=torch.int64)}
        if self.cache is not None:
            view.update(self.cache.entry(*full_key))
        return view


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


class CheckedImageFolder(SkipsUnreadable, ImageFolder):
    """ImageFolder that reads files with `distill.images.load_image`, ignores hidden entries, and names
    unreadable files, then skips them or stops.

    `bad_images="skip"`: a warning names the file and the reason, and the next readable image of
    the split stands in for it (a count of skipped files per process is kept in the message);
    `"error"`: stop with a `UserError` naming the file.
    """

    def __init__(self, root: str, transform: Any = None, bad_images: str = "skip") -> None:
        super().__init__(root, transform=transform, loader=load_image)
        self.bad_images, self.skipped = bad_images, 0

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return find_classes(directory)

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: Any = None, is_valid_file: Any = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """(path, class) of every image: hidden entries skipped, each real folder once (no symlink loops)."""
        samples, others = [], []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            files = list_images(Path(directory) / name, others)
            if not files and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the class {name}.")
            samples += [(str(path), index) for path in files]
        if others:
            warnings.warn(f"data: {left_out(others, directory)}", stacklevel=2)
        return samples

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def _describe(self, index: int) -> str:
        return f"image '{self.samples[index][0]}'"


# "How to train your ViT?" (Steiner et al. 2021): RandAugment (ops, magnitude) and mixup alpha.
AUGREG_PRESETS: dict[str, tuple[Optional[tuple[int, int]], float]] = {
    "none": (None, 0.0),
    "light1": ((2, 0), 0.0),
    "light2": ((2, 10), 0.2),
    "medium1": ((2, 15), 0.2),
    "medium2": ((2, 15), 0.5),
    "strong1": ((2, 20), 0.5),
    "strong2": ((2, 20), 0.8),
}


class ImageDataModule(pl.LightningDataModule):
    """Images and labels for the student and teacher, with the DeiT augmentation recipe.

    Args:
        dataset: `digits` (bundled), a folder with `train/` and `val/` class folders, or a Hugging
            Face `datasets` dataset on disk (a `save_to_disk` folder, or parquet files named after
            their splits: train and validation or val; needs the extra `.[hf]`).
        img_size: training and evaluation resolution (linked to the student by the CLI).
        batch_size: images per process and step.
        num_workers: data-loading processes per training process.
        auto_augment: timm RandAugment/AutoAugment policy (DeiT: rand-m9-mstd0.5-inc1); null for none.
        re_prob: random-erasing probability (DeiT: 0.25).
        re_mode: random-erasing fill: const, rand or pixel (DeiT: pixel).
        scale: RandomResizedCrop area range.
        hflip: horizontal-flip probability (0 for digits: a flipped digit is another glyph).
        color_jitter: colour-jitter strength (timm ignores it when auto_augment is set).
        crop_pct: evaluation centre-crop fraction (resize to img_size / crop_pct first).
        interpolation: resize interpolation (bicubic, bilinear, ...).
        mean: normalisation mean (also given to the model, so a teacher can re-normalise).
        std: normalisation std.
        mixup: mixup alpha, 0 disables (DeiT: 0.8).
        cutmix: cutmix alpha, 0 disables (DeiT: 1.0).
        mixup_prob: probability of mixing a batch at all.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        label_smoothing: folded into the mixed targets (linked from model.label_smoothing by the CLI).
        bad_images: what to do with an unreadable image file (truncated, not an image) in a
            folder dataset: `skip` (warn naming it, use the next image) or `error` (stop, naming it).
        repeated_aug: repeated augmentation: each image this many times per epoch, as views
            spread over consecutive ranks (DeiT: 3 in distributed training); 1: off.
        augreg: an AugReg preset (none, light1, light2, medium1, medium2, strong1, strong2):
            RandAugment `rand-n2-mM` and mixup alpha as in "How to train your ViT?", replacing
            auto_augment, mixup, cutmix (0) and re_prob (0). null: those options as given.
        image_column: the image column of a Hugging Face dataset.
        label_column: its class column (a ClassLabel, whose names are used, or integers 0..N-1).
        teacher_cache: a teacher-output cache folder written by `distill cache-teacher` for this
            data, seed and transform: training reads the teacher's top-k for each replayed view
            from it and runs no teacher (set model.teacher: null, or keep it to verify the
            cache with model.teacher_cache_verify). A cache of other data is refused.
    """

    def __init__(
        self,
        dataset: str = DIGITS,
        img_size: PositiveInt = 224,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: ClosedUnitInterval = 0.25,
        re_mode: Literal["const", "rand", "pixel"] = "pixel",
        scale: tuple[UnitIntervalOpenAtZero, UnitIntervalOpenAtZero] = (0.08, 1.0),
        hflip: ClosedUnitInterval = 0.5,
        color_jitter: NonNegativeFloat = 0.3,
        crop_pct: UnitIntervalOpenAtZero = 0.875,
        interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random"] = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_DEFAULT_STD,
        mixup: NonNegativeFloat = 0.8,
        cutmix: NonNegativeFloat = 1.0,
        mixup_prob: ClosedUnitInterval = 1.0,
        mixup_switch_prob: ClosedUnitInterval = 0.5,
        label_smoothing: HalfOpenUnitInterval = 0.1,
        bad_images: Literal["skip", "error"] = "skip",
        repeated_aug: PositiveInt = 1,
        augreg: Optional[Literal["none", "light1", "light2", "medium1", "medium2", "strong1", "strong2"]] = None,
        teacher_cache: Optional[str] = None,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        super().__init__()
        # built-in numbers, not jsonargparse's range types: checkpoints must load with weights_only
        self.save_hyperparameters(plain({k: v for k, v in locals().items() if k not in ("self", "__class__")}))
        if scale[0] > scale[1]:
            raise UserError(f"data.scale must be [min, max] with min <= max, got {list(scale)}")
        img_size, batch_size, num_workers = int(img_size), int(batch_size), int(num_workers)
        if augreg is not None:  # the preset decides augmentation and mixup; checkpoints record the values used
            randaugment, alpha = AUGREG_PRESETS[augreg]
            self.hparams.update(auto_augment=f"rand-n{randaugment[0]}-m{randaugment[1]}" if randaugment else None,
                                mixup=alpha, cutmix=0.0, re_prob=0.0)
        self.dataset, self.img_size, self.batch_size, self.num_workers = dataset, img_size, batch_size, num_workers
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.hf_splits: Optional[dict[str, Any]] = None  # a Hugging Face dataset's train and val splits
        self.classes = self._find_classes()
        self.mixup_fn = self._make_mixup()
        self._check_transform()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.teacher_cache = teacher_cache
        self.cache: Optional[TeacherCache] = None
        self._resume_at: tuple[int, int] = (0, 0)  # (epoch, batches of it done), from a checkpoint

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The classes as text (a folder name that is not UTF-8 shows its bytes as \\xNN)."""
        return [display_name(name) for name in self.classes]

    def _find_classes(self) -> list[str]:
        if self.dataset == DIGITS:
            if Path(DIGITS).is_dir():
                warnings.warn(f"data.dataset: '{DIGITS}' is the bundled digits set, not the folder './{DIGITS}' here; "
                              f"write './{DIGITS}' to train on the folder", stacklevel=2)
            return [str(c) for c in range(10)]
        root = Path(self.dataset)
        accepted = (f"expected '{DIGITS}', a folder with train/ and val/ class folders, or a Hugging Face dataset "
                    "folder (save_to_disk or parquet files)")
        if is_hf_dataset(root):
            train, val, classes = load_hf_splits(root, self.hparams.image_column, self.hparams.label_column)
            self.hf_splits = {"train": train, "val": val}
            return classes
        if root.is_file():
            raise UserError(f"data.dataset: '{root}' is a file, not a folder; {accepted}")
        if not root.is_dir():
            raise UserError(f"data.dataset: folder '{root}' does not exist; {accepted}")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"data.dataset: '{root}' has no {split}/ folder; {accepted}")
        train_classes, _ = _classes_of(root / "train")
        val_classes, _ = _classes_of(root / "val")
        if train_classes != val_classes:
            only = sorted(set(train_classes) ^ set(val_classes))[:5]
            raise UserError(f"data.dataset: train/ and val/ of '{root}' hold different class folders "
                            f"(e.g. {[display_name(name) for name in only]})")
        return train_classes

    def _make_mixup(self) -> Optional[Mixup]:
        hp = self.hparams
        if hp.mixup <= 0 and hp.cutmix <= 0:
            return None
        if self.batch_size % 2:
            raise UserError(f"data.batch_size must be even when mixup/cutmix is on (timm pairs images), got {self.batch_size}")
        return Mixup(
            mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob, switch_prob=hp.mixup_switch_prob,
            label_smoothing=hp.label_smoothing, num_classes=self.num_classes,
        )

    def _check_transform(self) -> None:
        """Build the training transform once now: a policy timm cannot parse is one line here, not a crash later."""
        try:
            policy = self.hparams.auto_augment or ""
            sections = policy.split("-")[1:] if policy.startswith(("rand", "augmix")) else []
            # timm skips a section without a number ("rand-zz") silently; a typo should not mean "defaults"
            if any(not re.fullmatch(r"[a-z]+[0-9.]+", section) for section in sections):
                raise ValueError(f"sections are letters then a number (m9, n2, mstd0.5, inc1), got {sections}")
            self.train_transform()
        except (AssertionError, ValueError, KeyError, IndexError) as err:
            raise UserError(f"data.auto_augment: '{self.hparams.auto_augment}' is not a timm augmentation policy "
                            f"({type(err).__name__}: {err}); e.g. rand-m9-mstd0.5-inc1 (RandAugment), "
                            "augmix-m5-w4-d2, original or v0 (AutoAugment), or null") from err

    def train_transform(self) -> Any:
        hp = self.hparams
        return create_transform(
            self.img_size, is_training=True, auto_augment=hp.auto_augment, re_prob=hp.re_prob, re_mode=hp.re_mode,
            scale=tuple(hp.scale), hflip=hp.hflip, color_jitter=hp.color_jitter, interpolation=hp.interpolation,
            mean=self.mean, std=self.std,
        )

    def eval_transform(self) -> Any:
        hp = self.hparams
        return create_transform(
            self.img_size, is_training=False, crop_pct=hp.crop_pct, interpolation=hp.interpolation,
            mean=self.mean, std=self.std,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            train = self.split_dataset("train", self.train_transform())
            if self.teacher_cache:
                self.cache = TeacherCache.open(self.teacher_cache, self.cache_fingerprint(train), self._epochs())
            self.train_set = SeededViews(train, global_seed(), self.cache)
        if self.val_set is None:
            self.val_set = self.split_dataset("val", self.eval_transform())

    def split_dataset(self, split: str, transform: Any) -> Dataset:
        """The `train` or `val` split of the dataset, each image through `transform`."""
        if self.dataset == DIGITS:
            return DigitsDataset(split, self.img_size, transform)
        if self.hf_splits is not None:
            hp = self.hparams
            return HFImageDataset(self.hf_splits[split], hp.image_column, hp.label_column, transform, hp.bad_images,
                                  name=f"the {split} split of '{self.dataset}'")
        folder = Path(self.dataset) / split
        classes, _ = _classes_of(folder)
        try:
            return CheckedImageFolder(str(folder), transform=transform, bad_images=self.hparams.bad_images)
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            empty = [c for c in classes if not any(is_image_file(p, folder) for p in (folder / c).rglob("*"))] or classes
            raise UserError(f"data.dataset: class folder '{display_name(str(folder / empty[0]))}' holds no images "
                            f"(accepted: {', '.join(IMG_EXTENSIONS)}; hidden files are ignored)") from err

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = self.train_sampler(world, rank)
        if len(sampler) < self.batch_size:  # drop_last: not one full batch, so not one optimiser step
            raise UserError(
                f"data.batch_size {self.batch_size} is larger than the {len(sampler)} training images each of the "
                f"{world} process(es) gets per epoch ({len(self.train_set)} images in the training split); every "
                "batch must be full, so no step would run: lower data.batch_size")
        # a resumed run: Lightning draws the first batches before its own set_epoch, so start here
        epoch, batches_done = self._resume_at
        sampler.set_epoch(epoch)
        sampler.resume(epoch, batches_done * self.batch_size)
        # drop_last: timm's mixup pairs images, so every batch must be full (and even)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
            collate_fn=TrainingBatch.collate,
        )

    def train_sampler(self, world: int = 1, rank: int = 0) -> EpochSampler:
        """The training order: shuffled by (seed, epoch), split over ranks, fixed pairs when mixing."""
        return EpochSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=global_seed(),
                            num_repeats=self.hparams.repeated_aug, pairs=self.mixup_fn is not None)

    def cache_fingerprint(self, train: Dataset) -> dict[str, Any]:
        """What the training views depend on: a teacher cache is valid only for the same values.

        The training images by their file list (relative paths and classes: a copy of the
        folder elsewhere is the same data) or a Hugging Face dataset's rows, the transform's options and its timm repr, the
        mixing options, repeated augmentation and the seed.
        """
        hp = self.hparams
        dataset = DIGITS
        if isinstance(train, HFImageDataset):
            dataset = train.fingerprint()
        elif self.dataset != DIGITS:
            root = Path(self.dataset) / "train"
            listing = "\n".join(f"{Path(path).relative_to(root)}\t{target}" for path, target in train.samples)
            dataset = f"{len(train.samples)} files, sha256 {hashlib.sha256(listing.encode()).hexdigest()[:16]}"
        options = ("auto_augment", "re_prob", "re_mode", "scale", "hflip", "color_jitter", "interpolation")
        transform = {"img_size": self.img_size, "mean": self.mean, "std": self.std, **{k: hp[k] for k in options},
                     "timm": repr(self.train_transform())}
        mixing = {k: hp[k] for k in ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob")} if self.mixup_fn else None
        fingerprint = {"dataset": dataset, "train_images": len(train), "classes": self.class_names, "seed": global_seed(),
                       "transform": transform, "mixing": mixing, "repeated_aug": hp.repeated_aug}
        return json.loads(json.dumps(fingerprint))  # as meta.json holds it (tuples become lists)

    def _epochs(self) -> Optional[int]:
        trainer = self.trainer
        return trainer.max_epochs if trainer is not None and trainer.max_epochs not in (None, -1) else None

    def state_dict(self) -> dict[str, int]:
        """Where training continues from (saved in checkpoints): epoch, batches of it already done, and the
        batch size and number of processes those batches were counted in."""
        if self.trainer is None or self.trainer.state.fn != "fit":  # validation within fit too
            return {}
        epoch, batches_done = _resume_position(self.trainer)
        return {"epoch": epoch, "batches_done": batches_done, "batch_size": self.batch_size,
                "world_size": self.trainer.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restored before the training loader is built: it starts at that epoch and batch.

        A checkpoint saved mid-epoch resumes only with the batch size and number of processes it was
        saved with (the batches already done were counted in them); at an epoch boundary another
        batch size or process count is accepted with a warning (the learning-rate schedule keeps the
        checkpoint's number of steps).
        """
        if not state:
            return
        epoch, batches_done = int(state["epoch"]), int(state["batches_done"])
        world = self.trainer.world_size if self.trainer is not None else 1
        saved = (int(state.get("batch_size", self.batch_size)), int(state.get("world_size", world)))
        if saved != (self.batch_size, world):
            what = (f"data.batch_size {saved[0]} x {saved[1]} process(es) in the checkpoint, "
                    f"{self.batch_size} x {world} now")
            if batches_done:
                raise UserError(f"ckpt_path: the checkpoint was saved in the middle of epoch {epoch} ({what}); resume "
                                f"with --data.batch_size {saved[0]} on {saved[1]} process(es), or start a new run from "
                                "its weights with model.init_from")
            warnings.warn(f"ckpt_path: {what}; the learning-rate schedule keeps the checkpoint's number of steps",
                          stacklevel=2)
        self._resume_at = (epoch, batches_done)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def _loader(self, dataset: Optional[Dataset], shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches: draw each pair's mixup/cutmix parameters, on the CPU."""
        if self.mixup_fn is not None and isinstance(batch, TrainingBatch):
            return batch.replace(mixing=mixing_params(batch.key, self.mixup_fn, tuple(batch.images.shape), global_seed()))
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Every tensor to the device but the mixing parameters: the mixing reads them on the host."""
        if isinstance(batch, TrainingBatch) and batch.mixing is not None:
            moved = super().transfer_batch_to_device(batch.replace(mixing=None), device, dataloader_idx)
            return moved.replace(mixing=batch.mixing)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mixup/cutmix of each training pair, on the device: targets become (B, C) soft labels."""
        if self.mixup_fn is not None and isinstance(batch, TrainingBatch) and batch.mixing is not None:
            images, targets = apply_mixing(batch.images, batch.targets, batch.mixing, self.mixup_fn)
            return batch.replace(images=images, targets=targets, mixing=None)
        return batch


def _resume_position(trainer: pl.Trainer) -> tuple[int, int]:
    """(epoch, batches of it already trained) that a checkpoint saved now resumes from."""
    done = batches_done_this_epoch(trainer)
    if done >= trainer.num_training_batches:  # saved at the end of the epoch: the next one starts afresh
        return trainer.current_epoch + 1, 0
    return trainer.current_epoch, done


def _classes_of(folder: Path) -> tuple[list[str], dict[str, int]]:
    try:
        return find_classes(str(folder))
    except FileNotFoundError as err:
        raise UserError(f"data.dataset: '{folder}' holds no class folders (hidden folders are ignored)") from err
