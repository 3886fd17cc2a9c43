"""Data for distillation: the data module over a source (distill/data/sources.py: digits, an ImageFolder, a
Hugging Face dataset).

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

import json
import re
import warnings
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset

from distill.cache.format import TeacherCache
from distill.common.adapters import batches_done_this_epoch
from distill.common.errors import UserError
from distill.common.ranges import (
    ClosedUnitInterval,
    HalfOpenUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalOpenAtZero,
    plain,
)
from distill.common.seeding import global_seed
from distill.data.batch import TrainingBatch
from distill.data.images import display_name
from distill.data.mixing import apply_mixing, mixing_params
from distill.data.sources import DIGITS, open_source
from distill.data.views import DigitsDataset, EpochSampler, SeededViews

__all__ = ["ImageDataModule", "DigitsDataset", "DIGITS", "EpochSampler", "SeededViews", "TRAINING_VIEWS"]

# The options that shape the training views and targets alone, not the data nor the validation views: what a
# comparison's arm without a teacher may set (the augmentation the student learns best from alone)
TRAINING_VIEWS = ("auto_augment", "re_prob", "re_mode", "scale", "hflip", "color_jitter", "mixup", "cutmix",
                  "mixup_prob", "mixup_switch_prob", "label_smoothing", "repeated_aug", "augreg")


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
        dataset: `digits` (bundled), a folder with `train/` and `val/` class folders (`val/` alone
            for validate and test: a held-out set), or a Hugging Face `datasets` dataset on disk (a
            `save_to_disk` folder, or parquet files named after their splits: train and validation or
            val; needs the extra `.[hf]`).
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
            cache with model.teacher_cache_verify; and model.feature_weight: 0, as the cache holds no
            features). A cache of other data is refused.
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
        self.source = open_source(dataset, img_size, image_column, label_column, bad_images)
        self.classes = self.source.classes
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
        return self.source.split(split, transform)

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
        dataset = self.source.fingerprint(train)
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


