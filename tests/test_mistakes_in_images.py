"""Images as users have them (16-bit, transparent, sideways, hidden, mis-named, linked, absurd): read as
training and predict expect, or named; never dropped in silence."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import cli_main
from distill.data.images import UnreadableImage, load_image
from tests.helpers import distill_args, make_image_folder


def test_16_bit_and_float_images_are_read_by_their_range_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "16bit.png")  # mode I;16: convert("RGB") would give white
    Image.fromarray((ramp / 65535.0).astype(np.float32), mode="F").save(tmp_path / "float.tiff")  # black by convert
    for name in ("16bit.png", "float.tiff"):
        grey = np.asarray(load_image(tmp_path / name))[..., 0].astype(int)
        assert np.abs(grey - np.rint(ramp / 257.0)).max() <= 1, name
    Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), mode="F").save(tmp_path / "odd.tiff")
    with pytest.raises(UnreadableImage, match=r"float image with values in \[300, 300\]; expected \[0, 1\] or \[0, 255\]"):
        load_image(tmp_path / "odd.tiff")


def test_a_transparent_background_becomes_white_not_black(tmp_path):
    glyph = np.zeros((6, 6, 4), dtype=np.uint8)  # transparent black everywhere...
    glyph[2:4, 2:4] = (0, 0, 0, 255)  # ...but an opaque black square
    Image.fromarray(glyph, mode="RGBA").save(tmp_path / "glyph.png")
    pixels = np.asarray(load_image(tmp_path / "glyph.png"))
    assert (pixels[0, 0] == 255).all() and (pixels[2, 2] == 0).all()


def test_a_photo_taken_sideways_is_read_upright_by_its_exif_orientation(tmp_path):
    stored = np.zeros((4, 6, 3), dtype=np.uint8)  # stored 6 wide, 4 high, a white top-left pixel
    stored[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    upright, plain = np.asarray(load_image(tmp_path / "sideways.png")), np.asarray(load_image(tmp_path / "plain.png"))
    assert upright.shape == (6, 4, 3) and (upright[0, -1] == 255).all()  # the top-left corner went top-right
    assert np.array_equal(plain, stored)


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path, recwarn):
    from distill.training.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / ".ipynb_checkpoints" / "x.png").write_bytes(b"not an image")
    (root / "train" / "cat" / ".thumbs").mkdir()
    (root / "train" / "cat" / ".thumbs" / "0.png").write_bytes(b"not an image")
    (root / "train" / "cat" / "._0.png").write_bytes(b"macOS resource fork")
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    assert data.class_names == ["cat", "dog", "fox"]
    assert len(data.train_set) == 18
    list(data.train_dataloader())
    assert not [w for w in recwarn if "skipped unreadable image" in str(w.message)]


def test_files_left_out_for_their_extension_are_named_not_dropped_silently(tmp_path):
    from distill.training.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "scan.gif")
    (root / "train" / "dog" / "labels.txt").write_text("dog")
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    with pytest.warns(UserWarning, match=r"left out 2 file\(s\) under .*train.* \(\.gif, \.txt; e\.g\. .*scan\.gif"):
        data.setup("fit")
    assert len(data.train_set) == 18


def test_a_class_folder_named_in_another_encoding_trains_and_draws_its_confusion_matrix(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("a", "b"))
    for split in ("train", "val"):
        os.rename(root / split / "b", os.path.join(os.fsencode(root / split), b"caf\xe9"))  # Latin-1, not UTF-8
    args = [*distill_args(tmp_path, teacher_classes=2), f"--data.dataset={root}", "--data.batch_size=4",
            "--telemetry.confusion_matrix=true"]
    cli_main(args)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["hyper_parameters"]["class_names"] == ["a", "caf\\xe9"]


def test_a_symbolic_link_back_up_the_tree_does_not_repeat_images_under_another_class(tmp_path):
    from distill.training.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    (root / "train" / "cat" / "back").symlink_to(root / "train")  # a loop through every class
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    assert len(data.train_set) == 18


def test_the_name_digits_beside_a_folder_called_digits_warns_which_one_is_used(tmp_path, monkeypatch):
    from distill.training.datamodule import ImageDataModule

    make_image_folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="'digits' is the bundled digits set, not the folder './digits'"):
        data = ImageDataModule("digits", img_size=32, num_workers=0)
    assert data.num_classes == 10 and len(ImageDataModule("./digits", img_size=32, num_workers=0).classes) == 3


def test_an_image_of_absurd_aspect_ratio_is_unreadable_not_a_memory_bomb(tmp_path):
    Image.fromarray(np.zeros((1, 5000, 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(UnreadableImage, match="5000x1 pixels: an aspect ratio over 100:1"):
        load_image(tmp_path / "strip.png")
