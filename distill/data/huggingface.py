"""A Hugging Face `datasets` dataset on disk as the training data, with exact replay.

`data.dataset` may name, besides `digits` and an ImageFolder tree:
  - a folder written by `DatasetDict.save_to_disk` (`dataset_dict.json`, one folder per split), or
  - a folder of parquet files named after their split, as the Hub lays them out
    (`train-00000-of-00002.parquet`, `validation-00000-of-00001.parquet`, also under `data/`).
The splits are `train` and `validation` (or `val`, or else `test`, with a warning); `data.image_column` holds the images (an
`Image` feature, or a dict with `bytes` / `path` as the Hub stores them) and `data.label_column`
the classes (a `ClassLabel`, whose names become the class names, or integers 0..N-1, every class in
the train split). Every label of both splits is checked against the classes when the dataset is
loaded (one array read, not row by row): one outside them is an error naming its split, row and value.

Rows are read by index from memory-mapped arrow tables, so a training view stays a function of
(seed, epoch, index), as for an ImageFolder, and the teacher cache replays it. Parquet files are
converted to such tables in a folder under $TMPDIR that the last process using it removes when it
exits (not in the `datasets` cache under ~/.cache/huggingface, where every dataset would stay). Images are decoded
by `distill.data.images.load_image` (EXIF orientation, 16-bit, palettes, CMYK as `predict` and the
folder path read them). The `datasets` library is the extra `pip install -e ".[hf]"`.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
from torch.utils.data import Dataset

from distill.common.errors import UserError
from distill.data.images import SkipsUnreadable, UnreadableImage, load_image

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
        return _checked_splits(splits, root, image_column, label_column)
    files = _parquet_files(root)
    copy, in_use = _shared_copy_folder(files)
    release = (os.getpid(), copy, in_use)
    atexit.register(_release, *release)
    try:
        return _checked_splits(_load_parquet(root, files, copy), root, image_column, label_column)
    except BaseException:
        _release(*release)  # a refused dataset leaves no copy behind
        raise


def _shared_copy_folder(files: list[Path]) -> tuple[Path, IO[str]]:
    """Where `datasets` writes the Arrow copy of parquet files that it reads rows from (memory-mapped): a folder under
    $TMPDIR, not ~/.cache/huggingface where every dataset would stay for good. It is named after the files as they are
    now (path, size, time), so the processes of a DDP run share one copy; each holds a shared lock on it until it exits
    (`_release`), and the last one removes it."""
    identity = "\n".join(f"{path.resolve()}\t{path.stat().st_size}\t{path.stat().st_mtime_ns}" for path in files)
    key = hashlib.sha256(f"{os.getuid()}\n{identity}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"distill-parquet-{key}"
    while True:
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise UserError(f"data.dataset: cannot make '{folder}' to convert the parquet files of "
                            f"'{files[0].parent}' in ({err.strerror}); set TMPDIR to a writable folder") from err
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            raise UserError(f"data.dataset: '{folder}', where the parquet files are converted, is not a folder of "
                            "yours; set TMPDIR to one")
        try:
            in_use = open(folder / ".in-use", "a")
        except FileNotFoundError:  # the last process using it removed it in between: make it again
            continue
        fcntl.flock(in_use, fcntl.LOCK_SH)
        if (folder / ".in-use").exists() and (folder / ".in-use").stat().st_ino == os.fstat(in_use.fileno()).st_ino:
            return folder, in_use
        in_use.close()  # locked after its last user removed it: make it again


def _release(pid: int, folder: Path, in_use: IO[str]) -> None:
    """At exit (or when the dataset is refused): remove the copy unless another process still holds it."""
    if os.getpid() != pid or in_use.closed:  # a forked DataLoader worker, or released already
        return
    try:
        fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(folder, ignore_errors=True)
    except BlockingIOError:  # another process reads it: the last one removes it
        pass
    in_use.close()


def _load_parquet(root: Path, files: list[Path], cache_dir: Path) -> dict[str, Any]:
    import datasets

    splits: dict[str, list[str]] = {}
    for path in files:
        splits.setdefault(_split_of(path), []).append(str(path))
    try:
        return dict(datasets.load_dataset("parquet", data_files=splits, cache_dir=str(cache_dir)))
    except Exception as err:
        if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in (err, err.__cause__, err.__context__)):
            size = sum(path.stat().st_size for path in files) / 2**30
            raise UserError(f"data.dataset: no space left in '{cache_dir}' for the Arrow copy of the parquet files of "
                            f"'{root}' (about {size:.1f} GiB); set TMPDIR to a folder with room") from err
        raise UserError(f"data.dataset: the parquet files of '{root}' are not readable ({type(err).__name__}: "
                        f"{str(err).strip()[:120]})") from err


def _checked_splits(splits: dict[str, Any], root: Path, image_column: str,
                    label_column: str) -> tuple[Any, Any, list[str]]:
    import datasets

    val_name = next((name for name in VAL_SPLITS if name in splits), None)
    if "train" not in splits or val_name is None:
        raise UserError(f"data.dataset: '{root}' has the splits {sorted(splits)}; expected train and "
                        f"one of {', '.join(VAL_SPLITS)}")
    train, val = splits["train"], splits[val_name]
    if val_name == "test":
        warnings.warn(f"data.dataset: '{root}' has no validation split; validating on its test split", stacklevel=3)
    for name, split in (("train", train), (val_name, val)):
        for option, column in (("data.image_column", image_column), ("data.label_column", label_column)):
            if column not in split.column_names:
                raise UserError(f"{option}: the {name} split of '{root}' has no column '{column}'; its columns are "
                                f"{split.column_names}")
        if len(split) == 0:
            raise UserError(f"data.dataset: the {name} split of '{root}' has no rows")
    classes = _class_names({"train": train, val_name: val}, label_column, root)
    # decode=False: the image bytes, read by load_image as the folder path reads files
    train, val = (split.cast_column(image_column, datasets.Image(decode=False))
                  if isinstance(split.features[image_column], datasets.Image) else split for split in (train, val))
    return train, val, classes


def _labels_of(split: Any, label_column: str) -> np.ndarray:
    """(rows,) the label column alone, as one array (float with NaN where a label is null)."""
    return np.asarray(split.with_format("numpy")[label_column][:])


def _class_names(splits: dict[str, Any], label_column: str, root: Path) -> list[str]:
    """The classes: a ClassLabel's names, or the training split's integers, which must be 0..K-1; every label of
    every split is checked against them (a label outside them would train a class that does not exist)."""
    import datasets

    train = splits["train"]
    feature = train.features[label_column]
    for name, split in splits.items():
        other = split.features[label_column]
        if not (isinstance(other, datasets.ClassLabel) or _is_integer(other)):
            raise UserError(f"data.label_column: '{label_column}' of '{root}' holds {other} in its {name} split; "
                            "expected a ClassLabel or integer classes 0..N-1")
        if isinstance(feature, datasets.ClassLabel) and isinstance(other, datasets.ClassLabel) and other != feature:
            raise UserError(f"data.label_column: '{label_column}' of the {name} split of '{root}' is {_short(other)}, "
                            f"but the train split's is {_short(feature)}; the splits must share one ClassLabel")
    labels = {name: _labels_of(split, label_column) for name, split in splits.items()}
    for name, values in labels.items():
        if values.dtype.kind not in "iu":  # nulls: `datasets` gives floats with NaN
            row = int(np.flatnonzero(np.isnan(values))[0])
            raise UserError(f"data.label_column: row {row} of the {name} split of '{root}' has no label (null); "
                            f"every row needs a class")
    if isinstance(feature, datasets.ClassLabel):
        names, source = list(feature.names), "its ClassLabel"
    else:
        names, source = _integer_classes(labels["train"], label_column, root), "the train split's labels"
    for name, values in labels.items():
        outside = np.flatnonzero((values < 0) | (values >= len(names)))
        if len(outside):
            row, value = int(outside[0]), int(values[outside[0]])
            unlabelled = ("; -1 marks an unlabelled row on the Hub: give the dataset a labelled validation split"
                          if value == -1 else "")
            accepted = f"0..{len(names) - 1}" if names else "none: no label of the train split is 0 or more"
            raise UserError(f"data.label_column: row {row} of the {name} split of '{root}' has the label {value}, "
                            f"not one of the {len(names)} classes {accepted} ({source}){unlabelled}")
    return names


def _integer_classes(train: np.ndarray, label_column: str, root: Path) -> list[str]:
    """Integer labels without a ClassLabel: the training split must hold every class of 0..K-1 (a gap would be a
    class no image teaches, e.g. labels 1..10 an eleventh class 0)."""
    present = np.unique(train[train >= 0])  # a negative label is refused with its row by the caller
    gaps = np.flatnonzero(present != np.arange(len(present)))
    if len(gaps):
        missing, value = int(gaps[0]), int(present[gaps[0]])
        row = int(np.flatnonzero(train == value)[0])
        raise UserError(f"data.label_column: row {row} of the train split of '{root}' has the label {value} but no "
                        f"row has the label {missing}; integer labels must be the classes 0..K-1, each in the train "
                        f"split: relabel them, or cast '{label_column}' to a ClassLabel naming every class")
    return [str(index) for index in range(len(present))]


def _is_integer(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class HFImageDataset(SkipsUnreadable, Dataset):
    """One split: (transformed image, class) by row index. Unreadable images: as image_folder.CheckedImageFolder (skip or stop)."""

    def __init__(self, split: Any, image_column: str, label_column: str, transform: Any = None,
                 bad_images: str = "skip", name: str = "") -> None:
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.transform, self.bad_images, self.name, self.skipped = transform, bad_images, name, 0
        self.targets: list[int] = _labels_of(split, label_column).tolist()  # one array read, not row by row

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
