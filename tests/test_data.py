"""Data: the bundled digits split, ImageFolder trees, timm transforms, mixup on training batches only."""
import pytest
import torch

from distill.data import DigitsDataset, ImageDataModule


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


class _Trainer:
    def __init__(self, training: bool) -> None:
        self.training = training


def test_mixup_makes_soft_targets_for_training_batches_only():
    data = ImageDataModule("digits", img_size=32, batch_size=8, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    data.trainer = _Trainer(training=True)
    mixed, targets = data.on_after_batch_transfer((images.clone(), labels), 0)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert not torch.equal(mixed, images)
    data.trainer = _Trainer(training=False)
    same, plain = data.on_after_batch_transfer((images, labels), 0)
    assert same is images and plain is labels


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
