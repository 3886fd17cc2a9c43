"""Shared fixtures: tiny models, weights files and image folders made in tmp_path; no network."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch

from students import Student
from tests.helpers import TINY_STUDENT, fill, make_image_folder, random_teacher_file, small_filesystem, train_tiny

torch.set_num_threads(min(2, torch.get_num_threads()))
# the data folders' remembered digests (distill/common/digests.py) go to a folder of the test run, not ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="distill-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)  # one folder a test run, not kept


@pytest.fixture
def full_disk(tmp_path: Path):
    """A folder on a 64 KiB filesystem that is full: every write to it fails with ENOSPC (a tmpfs: needs root)."""
    with small_filesystem(tmp_path / "full", "size=64k") as folder:
        fill(folder)
        yield folder


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """An empty folder that cannot be written, even by root (a read-only tmpfs where root; mode 0555 otherwise)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with small_filesystem(tmp_path / "read_only", "ro,size=64k") as folder:
        yield folder


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
