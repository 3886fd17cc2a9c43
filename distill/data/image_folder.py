"""An ImageFolder tree (ImageNet layout: `train/<class>/*`, `val/<class>/*`) as a data source: torchvision's
ImageFolder reading files as a viewer shows them (distill/data/images.py), hidden entries ignored, unreadable files named
and skipped or refused. The Hugging Face source is distill/data/huggingface.py."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.datasets import ImageFolder

from distill.common.errors import UserError
from distill.data.images import SkipsUnreadable, find_classes, left_out, list_images, load_image

__all__ = ["CheckedImageFolder", "classes_of"]


class CheckedImageFolder(SkipsUnreadable, ImageFolder):
    """ImageFolder that reads files with `distill.data.images.load_image`, ignores hidden entries, and names
    unreadable files, then skips them or stops.

    `bad_images="skip"`: a warning names the file and the reason, and the next readable image of
    the split stands in for it (a count of skipped files per process is kept in the message);
    `"error"`: stop with a `UserError` naming the file.
    """

    def __init__(self, root: str, transform: Any = None, bad_images: str = "skip") -> None:
        super().__init__(root, transform=transform, loader=load_image)
        self.bad_images, self.skipped = bad_images, 0

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return find_classes(directory)

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: Any = None, is_valid_file: Any = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """(path, class) of every image: hidden entries skipped, each real folder once (no symlink loops)."""
        samples, others = [], []
        for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            files = list_images(Path(directory) / name, others)
            if not files and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the class {name}.")
            samples += [(str(path), index) for path in files]
        if others:
            warnings.warn(f"data: {left_out(others, directory)}", stacklevel=2)
        return samples

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def _describe(self, index: int) -> str:
        return f"image '{self.samples[index][0]}'"


def classes_of(folder: Path) -> tuple[list[str], dict[str, int]]:
    try:
        return find_classes(str(folder))
    except FileNotFoundError as err:
        raise UserError(f"data.dataset: '{folder}' holds no class folders (hidden folders are ignored)") from err
