"""Shared fixtures: tiny models, weights files and image folders made in tmp_path; no network."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from students import Student
from tests.helpers import TINY_STUDENT, TINY_TEACHER, make_image_folder

torch.set_num_threads(min(2, torch.get_num_threads()))


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


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")
