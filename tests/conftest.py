"""Shared fixtures: tiny models, weights files and image folders made in tmp_path; no network."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from students import Student

torch.set_num_threads(min(2, torch.get_num_threads()))

# A DeiT student small enough for CPU tests in seconds: 32 px, patch 8, width 32, depth 2.
TINY_STUDENT = dict(model_name="deit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_TEACHER = "test_resnet"  # timm's 0.4M-parameter ResNet used for its own tests


def tiny_student(num_classes: int = 10, img_size: int = 32) -> Student:
    return Student(num_classes, img_size, **TINY_STUDENT)


@pytest.fixture
def student_factory():
    return partial(Student, **TINY_STUDENT)


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A random 10-class `test_resnet` saved as safetensors."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_TEACHER, num_classes=10)
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 6) -> Path:
    """An ImageNet-layout tree root/{train,val}/<class>/*.png of small coloured images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
                pixels[..., index % 3] += 150  # each class has its own dominant colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")
