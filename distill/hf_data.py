"""A Hugging Face `datasets` dataset on disk as the training data, with exact replay.

`data.dataset` may name, besides `digits` and an ImageFolder tree:
  - a folder written by `DatasetDict.save_to_disk` (`dataset_dict.json`, one folder per split), or
  - a folder of parquet files named after their split, as the Hub lays them out
    (`train-00000-of-00002.parquet`, `validation-00000-of-00001.parquet`, also under `data/`).
The splits are `train` and `validation` (or `val`, or else `test`, with a warning); `data.image_column` holds the images (an
`Image` feature, or a dict with `bytes` / `path` as the Hub stores them) and `data.label_column`
the classes (a `ClassLabel`, whose names become the class names, or integers 0..N-1).

Rows are read by index from memory-mapped arrow tables, so a training view stays a function of
(seed, epoch, index), as for an ImageFolder, and the teacher cache replays it. Images are decoded
by `distill.images.load_image` (EXIF orientation, 16-bit, palettes, CMYK as `predict` and the
folder path read them). The `datasets` library is the extra `pip install -e ".[hf]"`.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from distill.errors import UserError
from distill.images import SkipsUnreadable, UnreadableImage, load_image

__all__ = ["HFImageDataset", "is_hf_dataset", "load_hf_splits"]

VAL_SPLITS = ("validation", "val", "test")  # in this order: many Hub datasets have only train and test
INSTALL = 'pip install -e ".[hf]" (the `datasets` library)'


def _parquet_files(root: Path) -> list[Path]:
    return sorted([*root.glob("*.parquet"), *root.glob("data/*.parquet")])


def is_hf_dataset(root: Path) -> bool:
    """A folder that `save_to_disk` wrote, or that holds parquet files (at its top or under data/)."""
    return root.is_dir() and ((root / "dataset_dict.json").is_file() or bool(_parquet_files(root)))


def _split_of(path: Path) -> str:
    """`train-00000-of-00002.parquet` -> train; `validation.parquet` -> validation."""
    return path.stem.split("-")[0].split(".")[0]


def load_hf_splits(root: Path, image_column: str, label_column: str) -> tuple[Any, Any, list[str]]:
    """(train split, validation split, class names) of the dataset at `root`; one-line errors otherwise."""
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"data.dataset: '{root}' is a Hugging Face dataset; reading it needs {INSTALL}") from err
    if (root / "dataset_dict.json").is_file():
        try:
            splits = dict(datasets.load_from_disk(str(root)))
        except Exception as err:
            raise UserError(f"data.dataset: '{root}' is not a readable saved dataset ({type(err).__name__}: "
                            f"{str(err).strip()[:120]})") from err
    else:
        files: dict[str, list[str]] = {}
        for path in _parquet_files(root):
            files.setdefault(_split_of(path), []).append(str(path))
        try:
            splits = dict(datasets.load_dataset("parquet", data_files=files))
        except Exception as err:
            raise UserError(f"data.dataset: the parquet files of '{root}' are not readable ({type(err).__name__}: "
                            f"{str(err).strip()[:120]})") from err
    val_name = next((name for name in VAL_SPLITS if name in splits), None)
    if "train" not in splits or val_name is None:
        raise UserError(f"data.dataset: '{root}' has the splits {sorted(splits)}; expected train and "
                        f"one of {', '.join(VAL_SPLITS)}")
    train, val = splits["train"], splits[val_name]
    if val_name == "test":
        warnings.warn(f"data.dataset: '{root}' has no validation split; validating on its test split", stacklevel=2)
    for name, split in (("train", train), (val_name, val)):
        for option, column in (("data.image_column", image_column), ("data.label_column", label_column)):
            if column not in split.column_names:
                raise UserError(f"{option}: the {name} split of '{root}' has no column '{column}'; its columns are "
                                f"{split.column_names}")
        if len(split) == 0:
            raise UserError(f"data.dataset: the {name} split of '{root}' has no rows")
    # decode=False: the image bytes, read by load_image as the folder path reads files
    train, val = (split.cast_column(image_column, datasets.Image(decode=False))
                  if isinstance(split.features[image_column], datasets.Image) else split for split in (train, val))
    return train, val, _class_names(train, val, label_column, root)


def _class_names(train: Any, val: Any, label_column: str, root: Path) -> list[str]:
    import datasets

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    labels = [*train[label_column], *val[label_column]]
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        raise UserError(f"data.label_column: '{label_column}' of '{root}' holds {feature}; expected a ClassLabel "
                        "or integer classes 0..N-1")
    if min(labels) < 0:
        raise UserError(f"data.label_column: '{label_column}' of '{root}' holds the class {min(labels)}; "
                        "expected classes 0..N-1")
    return [str(index) for index in range(max(labels) + 1)]


class HFImageDataset(SkipsUnreadable, Dataset):
    """One split: (transformed image, class) by row index. Unreadable images: as CheckedImageFolder (skip or stop)."""

    def __init__(self, split: Any, image_column: str, label_column: str, transform: Any = None,
                 bad_images: str = "skip", name: str = "") -> None:
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.transform, self.bad_images, self.name, self.skipped = transform, bad_images, name, 0
        self.targets: list[int] = [int(label) for label in split[label_column]]

    def __len__(self) -> int:
        return len(self.targets)

    def fingerprint(self) -> str:
        """Rows, classes, and each arrow file's size and first and last MiB (not the whole file: an ImageNet-sized
        dataset is read once per epoch, not once more per fingerprint). A copy of the folder elsewhere is the same data."""
        digest = hashlib.sha256("\n".join(map(str, self.targets)).encode())
        for entry in self.split.cache_files:
            with open(entry["filename"], "rb") as file:
                size = file.seek(0, 2)
                file.seek(0)
                digest.update(f"{size}".encode() + file.read(1 << 20))
                file.seek(max(0, size - (1 << 20)))
                digest.update(file.read())
        return f"{len(self)} rows, sha256 {digest.hexdigest()[:16]}"

    def _describe(self, index: int) -> str:
        return f"image at row {index} of {self.name}"

    def _read(self, index: int) -> tuple[Any, int]:
        return self._decode(index), self.targets[index]

    def _decode(self, index: int) -> Any:
        value = self.split[index][self.image_column]
        if isinstance(value, dict):  # {"bytes": ..., "path": ...}: bytes first, as datasets decodes it
            source: Any | None = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
            if source is None:
                raise UnreadableImage("an empty image cell")
            return load_image(source)
        if isinstance(value, (bytes, bytearray)):
            return load_image(io.BytesIO(value))
        if hasattr(value, "convert"):  # a PIL image already
            return value.convert("RGB")
        raise UnreadableImage(f"a {type(value).__name__} in the image column, not an image")
