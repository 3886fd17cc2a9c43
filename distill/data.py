"""Data for distillation: an ImageFolder tree (ImageNet layout) or the bundled digits set.

Transforms are timm's (`create_transform`: RandomResizedCrop, flip, RandAugment, random
erasing; resize + centre crop for evaluation). Mixup/cutmix (timm `Mixup`) is applied once
per training batch after it reaches the device, so the teacher labels exactly the mixed
image the student sees.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

__all__ = ["ImageDataModule", "DigitsDataset", "DIGITS"]

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


class ImageDataModule(pl.LightningDataModule):
    """Images and labels for the student and teacher, with the DeiT augmentation recipe.

    Args:
        dataset: `digits` (bundled) or a folder with `train/` and `val/` class folders.
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
    """

    def __init__(
        self,
        dataset: str = DIGITS,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float = 0.3,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset, self.img_size, self.batch_size, self.num_workers = dataset, img_size, batch_size, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes = self._find_classes()
        self.mixup_fn = self._make_mixup()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def _find_classes(self) -> list[str]:
        if self.dataset == DIGITS:
            return [str(c) for c in range(10)]
        root = Path(self.dataset)
        accepted = f"expected '{DIGITS}' or a folder with train/ and val/ class folders"
        if not root.is_dir():
            raise FileNotFoundError(f"data.dataset: folder '{root}' does not exist; {accepted}")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(f"data.dataset: '{root}' has no {split}/ folder; {accepted}")
        train_classes, _ = _classes_of(root / "train")
        val_classes, _ = _classes_of(root / "val")
        if train_classes != val_classes:
            only = sorted(set(train_classes) ^ set(val_classes))[:5]
            raise ValueError(f"data.dataset: train/ and val/ of '{root}' hold different class folders (e.g. {only})")
        return train_classes

    def _make_mixup(self) -> Optional[Mixup]:
        hp = self.hparams
        if hp.mixup <= 0 and hp.cutmix <= 0:
            return None
        if self.batch_size % 2:
            raise ValueError(f"data.batch_size must be even when mixup/cutmix is on (timm pairs images), got {self.batch_size}")
        return Mixup(
            mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob, switch_prob=hp.mixup_switch_prob,
            label_smoothing=hp.label_smoothing, num_classes=self.num_classes,
        )

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
            self.train_set = self._dataset("train", self.train_transform())
        if self.val_set is None:
            self.val_set = self._dataset("val", self.eval_transform())

    def _dataset(self, split: str, transform: Any) -> Dataset:
        if self.dataset == DIGITS:
            return DigitsDataset(split, self.img_size, transform)
        return ImageFolder(os.path.join(self.dataset, split), transform=transform)

    def train_dataloader(self) -> DataLoader:
        # drop_last: timm's mixup pairs images, so every batch must be full (and even)
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def _loader(self, dataset: Optional[Dataset], shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mixup/cutmix once per training batch, on the device: targets become (B, C) soft labels."""
        if self.mixup_fn is not None and self.trainer is not None and self.trainer.training:
            images, targets = batch
            return self.mixup_fn(images, targets)
        return batch


def _classes_of(folder: Path) -> tuple[list[str], dict[str, int]]:
    try:
        return find_classes(str(folder))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.dataset: '{folder}' holds no class folders") from err
