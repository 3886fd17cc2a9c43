"""Shared fixtures: tiny models, weights files and image folders made in tmp_path; no network."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from students import Student
from tests.helpers import TINY_STUDENT, make_image_folder, random_teacher_file, train_tiny

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def student_factory():
    return partial(Student, **TINY_STUDENT)


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A random 10-class `test_resnet` saved as safetensors."""
    return random_teacher_file(tmp_path, name="teacher.safetensors")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny DeiT student distilled at 32 px on a generated 3-class folder, its teacher, and the data (shared:
    tests write their exports and stages beside it, never into it)."""
    return train_tiny(tmp_path_factory.mktemp("trained"))
