"""Data: the bundled digits split, ImageFolder trees, timm transforms, mixup on training batches only."""
from types import SimpleNamespace

import pytest
import torch

from distill.data import DigitsDataset, EpochSampler, ImageDataModule


def test_digits_split_is_fixed_stratified_and_upscaled():
    train, val = DigitsDataset("train", 32), DigitsDataset("val", 32)
    assert (len(train), len(val)) == (1437, 360)
    assert sorted(set(val.targets)) == list(range(10))
    assert all(val.targets.count(c) in (35, 36, 37) for c in range(10))  # stratified: ~36 per class
    assert train.images[0].size == (32, 32) and train.images[0].mode == "RGB"
    assert DigitsDataset("val", 32).targets == val.targets


def test_datamodule_gives_normalised_tensors_at_the_configured_size(image_folder):
    data = ImageDataModule(str(image_folder), img_size=16, batch_size=4, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    assert data.class_names == ["cat", "dog", "fox"] and data.num_classes == 3
    assert images.min() < 0 < images.max()  # normalised, not raw [0, 1]


def fake_trainer(training: bool, epoch: int = 0, batch: int = 0) -> SimpleNamespace:
    """What the data module reads of a Trainer: its stage, epoch, rank and the batch index."""
    progress = SimpleNamespace(current=SimpleNamespace(ready=batch))
    return SimpleNamespace(training=training, current_epoch=epoch, global_rank=0,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_mixup_makes_soft_targets_for_training_batches_only_seeded_by_epoch_and_batch():
    data = ImageDataModule("digits", img_size=32, batch_size=8, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    data.trainer = fake_trainer(training=True)
    mixed, targets = data.on_after_batch_transfer((images.clone(), labels), 0)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert not torch.equal(mixed, images)
    again, _ = data.on_after_batch_transfer((images.clone(), labels), 0)
    assert torch.equal(again, mixed)  # same (epoch, batch): the same mixing, as after a restart
    data.trainer = fake_trainer(training=True, batch=1)
    other, _ = data.on_after_batch_transfer((images.clone(), labels), 0)
    assert not torch.equal(other, mixed)
    data.trainer = fake_trainer(training=False)
    same, plain = data.on_after_batch_transfer((images, labels), 0)
    assert same is images and plain is labels


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_views_depend_on_seed_epoch_and_index_only_not_on_workers(workers):
    # RandAugment + random erasing + random crop: every random draw of the transform is seeded per sample
    kwargs = dict(img_size=32, batch_size=16, mixup=0, cutmix=0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    reference = ImageDataModule("digits", num_workers=0, **kwargs)
    reference.setup("fit")
    data = ImageDataModule("digits", num_workers=workers, **kwargs)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(3)
    images, labels = next(iter(loader))
    keys = list(loader.sampler)[:16]
    assert all(epoch == 3 for epoch, _ in keys)
    expected = torch.stack([reference.train_set[key][0] for key in keys])
    assert torch.equal(images, expected)
    assert not torch.equal(reference.train_set[(4, keys[0][1])][0], expected[0])  # another epoch, another view


def test_the_training_sampler_splits_each_epoch_across_ranks_without_overlap():
    data = ImageDataModule("digits", img_size=32, mixup=0, cutmix=0)
    data.setup("fit")
    shares = [list(EpochSampler(data.train_set, num_replicas=2, rank=rank, seed=0)) for rank in (0, 1)]
    indices = [{index for _, index in share} for share in shares]
    assert len(shares[0]) == len(shares[1]) == 719  # 1437 images, padded by one to split evenly
    assert len(indices[0] | indices[1]) == 1437 and len(indices[0] & indices[1]) <= 1
    sampler = EpochSampler(data.train_set, seed=0)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.resume(1, 100)  # a mid-epoch restart skips what was trained
    assert list(sampler) == first[100:] and list(sampler) == first  # only once


@pytest.mark.parametrize("make, message", [
    (lambda tmp: ImageDataModule(str(tmp / "missing")), "missing' does not exist"),
    (lambda tmp: ImageDataModule(str(tmp)), "has no train/ folder"),
    (lambda tmp: ImageDataModule("digits", batch_size=7), "batch_size must be even"),
])
def test_bad_data_options_are_clear_errors(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make(tmp_path)


def test_train_and_val_with_different_classes_is_an_error(image_folder):
    (image_folder / "val" / "fox").rename(image_folder / "val" / "wolf")
    with pytest.raises(ValueError, match="different class folders"):
        ImageDataModule(str(image_folder))
