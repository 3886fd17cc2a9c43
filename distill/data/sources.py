"""Where the images come from: one small interface, one class per kind of `data.dataset`.

A `Source` gives its class names, each split (`train`, `val`) as a Dataset of (image through the given
transform, class index), and a fingerprint of its training images (what a teacher cache was built from).
`open_source` chooses the source `data.dataset` names:

    digits                 DigitsSource       scikit-learn's bundled 8x8 digits, split 80/20
    a Hugging Face folder  HuggingFaceSource  `save_to_disk` or parquet files (distill/data/huggingface.py)
    any other folder       FolderSource       train/ and val/ class folders (ImageNet layout)

A new kind of data is one class with these three members and a line in `open_source`; the data module,
the teacher cache and INT8 calibration take it from there. No Lightning here (INT8 export reads its
calibration and check images through a source).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol

from torch.utils.data import Dataset

from distill.common.digests import file_digests
from distill.common.errors import UserError
from distill.data.huggingface import HFImageDataset, is_hf_dataset, load_hf_splits
from distill.data.image_folder import CheckedImageFolder, classes_of
from distill.data.images import IMG_EXTENSIONS, display_name, is_image_file
from distill.data.views import DigitsDataset

__all__ = ["DIGITS", "Source", "DigitsSource", "FolderSource", "HuggingFaceSource", "open_source"]

DIGITS = "digits"
Split = Literal["train", "val"]
ACCEPTED = (f"expected '{DIGITS}', a folder with train/ and val/ class folders, or a Hugging Face dataset folder "
            "(save_to_disk or parquet files)")


class Source(Protocol):
    """What the data module needs of a kind of data."""

    classes: list[str]  # class names, in the order of the class indices

    def split(self, name: Split, transform: Any) -> Dataset:
        """The split's images through `transform`, with their class indices."""
        ...

    def fingerprint(self, train: Dataset) -> str:
        """What the training images are (`train`: this source's train split), by content where it can be read."""
        ...


class DigitsSource:
    """scikit-learn's bundled digits (1797 8x8 scans), upscaled to `img_size`."""

    def __init__(self, img_size: int) -> None:
        self.img_size = img_size
        self.classes = [str(c) for c in range(10)]

    def split(self, name: Split, transform: Any) -> Dataset:
        return DigitsDataset(name, self.img_size, transform)

    def fingerprint(self, train: Dataset) -> str:
        return DIGITS


class FolderSource:
    """An ImageNet-layout folder: `train/<class>/*` and `val/<class>/*`, the same class folders in both."""

    def __init__(self, root: Path, bad_images: str) -> None:
        if root.is_file():
            raise UserError(f"data.dataset: '{root}' is a file, not a folder; {ACCEPTED}")
        if not root.is_dir():
            raise UserError(f"data.dataset: folder '{root}' does not exist; {ACCEPTED}")
        if not (root / "val").is_dir():
            raise UserError(f"data.dataset: '{root}' has no val/ folder; {ACCEPTED}")
        # val/ alone is a held-out set: validate and test read it; fit asks for train/ (`split`)
        train_classes = classes_of(root / "train")[0] if (root / "train").is_dir() else None
        val_classes, _ = classes_of(root / "val")
        if train_classes is not None and train_classes != val_classes:
            only = sorted(set(train_classes) ^ set(val_classes))[:5]
            raise UserError(f"data.dataset: train/ and val/ of '{root}' hold different class folders "
                            f"(e.g. {[display_name(name) for name in only]})")
        self.root, self.bad_images, self.classes = root, bad_images, val_classes

    def split(self, name: Split, transform: Any) -> Dataset:
        folder = self.root / name
        if not folder.is_dir():  # a held-out folder (val/ alone) given to fit
            raise UserError(f"data.dataset: '{self.root}' has no {name}/ folder; training needs train/ and val/ "
                            "class folders (validate and test read val/ alone)")
        try:
            return CheckedImageFolder(str(folder), transform=transform, bad_images=self.bad_images)
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            empty = [c for c in self.classes if not any(is_image_file(p, folder) for p in (folder / c).rglob("*"))]
            raise UserError(f"data.dataset: class folder '{display_name(str(folder / (empty or self.classes)[0]))}' "
                            f"holds no images (accepted: {', '.join(IMG_EXTENSIONS)}; hidden files are ignored)") from err

    def fingerprint(self, train: Dataset) -> str:
        """Each training image by its path relative to train/, class, size and content (distill/common/digests.py):
        a copy of the folder elsewhere is the same data, the same names with other pixels are not."""
        root = self.root / "train"
        files = [Path(path).relative_to(root) for path, _ in train.samples]
        digests = file_digests(root, files)
        listing = "\n".join(f"{path.as_posix()}\t{target}\t{size}\t{digest}"
                            for path, (_, target), (size, digest) in zip(files, train.samples, digests))
        return f"{len(train.samples)} files, sha256 {hashlib.sha256(listing.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


class HuggingFaceSource:
    """A Hugging Face `datasets` dataset on disk, its image and label columns named by the options."""

    def __init__(self, root: Path, image_column: str, label_column: str, bad_images: str) -> None:
        train, val, self.classes = load_hf_splits(root, image_column, label_column)
        self.root, self.splits = root, {"train": train, "val": val}
        self.image_column, self.label_column, self.bad_images = image_column, label_column, bad_images

    def split(self, name: Split, transform: Any) -> Dataset:
        return HFImageDataset(self.splits[name], self.image_column, self.label_column, transform, self.bad_images,
                              name=f"the {name} split of '{self.root}'")

    def fingerprint(self, train: Dataset) -> str:
        return train.fingerprint()


def open_source(dataset: str, img_size: int, image_column: str = "image", label_column: str = "label",
                bad_images: str = "error") -> Source:
    """The source `data.dataset` names; a one-line UserError for anything else."""
    if dataset == DIGITS:
        if Path(DIGITS).is_dir():
            warnings.warn(f"data.dataset: '{DIGITS}' is the bundled digits set, not the folder './{DIGITS}' here; "
                          f"write './{DIGITS}' to train on the folder", stacklevel=3)
        return DigitsSource(img_size)
    root = Path(dataset)
    if is_hf_dataset(root):
        return HuggingFaceSource(root, image_column, label_column, bad_images)
    return FolderSource(root, bad_images)
