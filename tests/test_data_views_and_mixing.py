"""Data: the bundled digits split, ImageFolder trees, timm transforms, mixup on training batches only."""

import pytest
import torch

from distill.common.errors import UserError
from distill.data.batch import TrainingBatch
from distill.training.datamodule import DigitsDataset, EpochSampler, ImageDataModule


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
    batch = next(iter(data.train_dataloader()))
    images, labels = batch.images, batch.targets
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    assert batch.key.shape == (4, 3) and batch.seed.shape == (4,)  # (epoch, index, repeat) of each view, its seed
    assert batch.teacher_index is None and batch.mixing is None
    assert data.class_names == ["cat", "dog", "fox"] and data.num_classes == 3
    assert images.min() < 0 < images.max()  # normalised, not raw [0, 1]


def mix(data, images, labels, keys):
    """The data module's two batch hooks (before and after the device transfer) on a training batch."""
    batch = TrainingBatch(images.clone(), labels, key=torch.tensor(keys), seed=torch.zeros(len(keys), dtype=torch.int64))
    batch = data.on_before_batch_transfer(batch, 0)
    assert batch.mixing.shape == (len(keys), 6)  # drawn before the transfer, on the CPU
    batch = data.on_after_batch_transfer(batch, 0)
    return batch.images, batch.targets, batch


def test_mixup_mixes_fixed_pairs_seeded_by_the_pair_not_by_the_batch():
    data = ImageDataModule("digits", img_size=32, batch_size=8, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    keys = [(0, 10 + i, 0) for i in range(8)]
    mixed, targets, batch = mix(data, images, labels, keys)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    assert batch.mixing is None and not torch.equal(mixed, images)  # the parameters are used up
    for j in (0, 2, 4, 6):  # each image is mixed with its pair partner only, with the pair's lam
        pair = labels[j:j + 2]
        assert torch.allclose(targets[j, pair].sum(), torch.tensor(0.92))  # on 0.91 + off 0.01 (smoothing 0.1)
        assert torch.allclose(targets[j, pair[0]], targets[j + 1, pair[1]])
    again, _, _ = mix(data, images, labels, keys)
    assert torch.equal(again, mixed)  # the same pairs: the same mixing, as after a restart
    # the last two pairs alone (a batch of 4, e.g. on another rank or with another batch size): the same images
    half, half_targets, _ = mix(data, images[4:], labels[4:], keys[4:])
    assert torch.equal(half, mixed[4:]) and torch.equal(half_targets, targets[4:])
    other, _, _ = mix(data, images, labels, [(1, 10 + i, 0) for i in range(8)])
    assert not torch.equal(other, mixed)  # another epoch: other draws
    same, plain = data.on_after_batch_transfer(data.on_before_batch_transfer((images, labels), 0), 0)
    assert same is images and plain is labels  # validation batches (plain pairs) are never mixed


def test_each_pair_is_mixed_exactly_as_timm_mixes_a_batch_of_that_pair():
    """Per-pair mixing is timm's batch Mixup applied to each pair alone (x with its partner, x.flip(0)),
    under the pair's own seed: the same lam, the same cutmix box, the same targets."""
    import numpy as np

    from distill.common.seeding import global_seed, sample_seed
    data = ImageDataModule("digits", img_size=32, batch_size=16, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    keys = [(2, 100 + i, 0) for i in range(16)]
    mixed, targets, _ = mix(data, images, labels, keys)
    kinds = set()
    for j in range(0, 16, 2):
        np.random.seed(sample_seed(global_seed(), 2, 100 + j, 101 + j, 0, 3))
        expected, expected_targets = data.mixup_fn(images[j:j + 2].clone(), labels[j:j + 2])
        assert torch.allclose(mixed[j:j + 2], expected, atol=1e-6), j  # timm rounds lam as a double
        assert torch.allclose(targets[j:j + 2], expected_targets), j
        kinds.add("cutmix" if torch.equal(mixed[j][images[j] != mixed[j]], images[j + 1][images[j] != mixed[j]])
                  else "mixup")
    assert kinds == {"cutmix", "mixup"}  # both kinds drawn among these pairs
    # the pixels runs have always had: x * lam + partner * (1 - lam) in float32, bit for bit
    params = data.on_before_batch_transfer(TrainingBatch(images, labels, key=torch.tensor(keys),
                                                         seed=torch.zeros(16, dtype=torch.int64)), 0).mixing
    for j in range(16):
        if params[j, 1] == 0:  # a mixup pair
            assert torch.equal(mixed[j], images[j] * params[j, 0] + images[j ^ 1] * (1 - params[j, 0])), j
    # the CPU mixes pair by pair, an accelerator all pairs at once: the same bits either way
    from distill.data.mixing import _mix_all_pairs
    batched = images.clone()
    _mix_all_pairs(batched, params)
    assert torch.equal(batched, mixed)


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
    batch = next(iter(loader))
    keys = list(loader.sampler)[:16]
    assert batch.key.tolist() == [[*key, 0] for key in keys]
    assert all(epoch == 3 for epoch, _ in keys)
    expected = torch.stack([reference.train_set[key]["image"] for key in keys])
    assert torch.equal(batch.images, expected)
    assert not torch.equal(reference.train_set[(4, keys[0][1])]["image"], expected[0])  # another epoch, another view


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
    (lambda tmp: ImageDataModule(str(tmp)), "has no val/ folder"),
    (lambda tmp: ImageDataModule("digits", batch_size=7), "batch_size must be even"),
])
def test_bad_data_options_are_clear_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        make(tmp_path)


def test_train_and_val_with_different_classes_is_an_error(image_folder):
    (image_folder / "val" / "fox").rename(image_folder / "val" / "wolf")
    with pytest.raises(UserError, match="different class folders"):
        ImageDataModule(str(image_folder))


def test_deit_randaugment_at_its_top_magnitude_does_not_crash():
    # rand-m9-mstd0.5-inc1 samples magnitudes up to 10: PosterizeIncreasing then keeps 0 bits,
    # which Pillow 13 refuses (hence pillow<13 in pyproject.toml)
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert out.getpixel((0, 0)) == (0, 0, 0)


class Squares:
    """A kind of data the project does not ship, in memory: a source is three members (distill/data/sources.py)."""

    classes = ["red", "blue"]

    def split(self, name, transform):
        from PIL import Image
        images = [(Image.new("RGB", (12, 12), ("red", "blue")[i % 2]), i % 2) for i in range(8 if name == "train" else 4)]
        return [(transform(image), label) for image, label in images]

    def fingerprint(self, train):
        return f"squares, {len(train)} images"


def test_a_new_kind_of_data_is_one_source_class_and_the_data_module_takes_it_from_there(monkeypatch):
    monkeypatch.setattr("distill.training.datamodule.open_source", lambda *args, **kwargs: Squares())
    data = ImageDataModule("squares", img_size=16, batch_size=4, num_workers=0, mixup=0.0, cutmix=0.0, auto_augment=None,
                           re_prob=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    images, labels = next(iter(data.val_dataloader()))
    assert data.class_names == ["red", "blue"] and batch.images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 1, 0, 1]
    assert data.cache_fingerprint(data.train_set.dataset)["dataset"] == "squares, 8 images"  # what a teacher cache keys on
