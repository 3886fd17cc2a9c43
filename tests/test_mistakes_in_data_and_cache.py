"""Mistakes inside the data and the teacher cache, refused with one line before any epoch; nothing earlier is lost.

- Integer labels of a Hugging Face dataset (no ClassLabel) that are not 0..K-1 (1..10 would train a class "0"
  that no image teaches; a stray 100000 would allocate 80 GB).
- A validation label that is not one of the training classes.
- The Hub's -1 (an unlabelled row) in a test split that stands in for a missing validation split.
- A label beyond the range of its ClassLabel.
- Parquet files: `datasets` copies them to Arrow, which must not pile up in ~/.cache/huggingface.
- A teacher cache holding a class out of range or a NaN probability: `cache-teacher --check` and training from it.
- The data counted by content: a cache built for the same file names with other pixels, a resume after images were
  added to a class; a copy of the folder elsewhere is the same data.
- cache-teacher onto a full disk or into a read-only folder.

Every refusal: exit code 2, one `error:` line naming the split or file, the row or entry, and the value.
"""
import atexit
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.cli import cli_main
from tests.helpers import (TINY_TEACHER, distill_args, files_under, make_image_folder, nothing_written,
                           random_teacher_file, run_cli_error, shrink)

datasets = pytest.importorskip("datasets")


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def hf_dataset(folder: Path, splits: dict[str, list[int]], label: object = None) -> Path:
    """A saved DatasetDict with one tiny image per row and these labels (plain int64, or cast to `label`)."""
    image = png()
    built = {}
    for name, labels in splits.items():
        split = datasets.Dataset.from_dict({"image": [{"bytes": image, "path": None}] * len(labels), "label": labels},
                                           features=datasets.Features({"image": datasets.Image(),
                                                                       "label": datasets.Value("int64")}))
        built[name] = split.cast_column("label", label) if label is not None else split
    datasets.DatasetDict(built).save_to_disk(str(folder))
    return folder


def refusal(args: list[str], capsys) -> str:
    """The one `error:` line of a command that exits with code 2, without the pointer to DISTILL_DEBUG."""
    return run_cli_error(args, capsys).removesuffix("  (DISTILL_DEBUG=1 shows the traceback)")


def fit_on(tmp_path: Path, dataset: Path) -> list[str]:
    return ["fit", *shrink(tmp_path, "teacher.yaml"), f"--data.dataset={dataset}", "--data.batch_size=2"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache of the test's own, and a temporary folder of its own: both must stay empty."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(tempfile, "tempdir", str((tmp_path / "tmp").resolve()))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "hf_cache"


def test_integer_labels_1_to_10_are_refused_instead_of_training_a_class_0_that_no_image_has(tmp_path, capsys):
    data = hf_dataset(tmp_path / "data", {"train": list(range(1, 11)), "validation": list(range(1, 11))})
    line = refusal(fit_on(tmp_path, data), capsys)
    assert line == (f"error: data.label_column: row 0 of the train split of '{data}' has the label 1 but no row has "
                    "the label 0; integer labels must be the classes 0..K-1, each in the train split: relabel them, "
                    "or cast 'label' to a ClassLabel naming every class")
    assert nothing_written(tmp_path)


def test_a_huge_training_label_is_refused_naming_its_row_instead_of_allocating_its_classes(tmp_path, capsys):
    data = hf_dataset(tmp_path / "data", {"train": [0, 1, 2, 100000, 1], "validation": [0, 1, 2]})
    line = refusal(fit_on(tmp_path, data), capsys)
    assert line.startswith(f"error: data.label_column: row 3 of the train split of '{data}' has the label 100000 "
                           "but no row has the label 3;")


def test_a_validation_label_that_no_training_row_has_is_refused_naming_split_row_and_value(tmp_path, capsys):
    data = hf_dataset(tmp_path / "data", {"train": [0, 1, 2, 0, 1, 2], "validation": [0, 1, 2, 12]})
    line = refusal(fit_on(tmp_path, data), capsys)
    assert line == (f"error: data.label_column: row 3 of the validation split of '{data}' has the label 12, not one "
                    "of the 3 classes 0..2 (the train split's labels)")


def test_the_hubs_minus_1_in_a_test_split_standing_in_for_validation_is_refused_as_unlabelled(tmp_path, capsys):
    names = datasets.ClassLabel(names=["cat", "dog", "fox"])
    data = hf_dataset(tmp_path / "data", {"train": [0, 1, 2, 0], "test": [-1, -1, -1]}, label=names)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(fit_on(tmp_path, data))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "UserWarning: " in err and "validating on its test split" in err  # one line
    line = next(line for line in err.splitlines() if line.startswith("error: ")).removesuffix(
        "  (DISTILL_DEBUG=1 shows the traceback)")
    assert line == (f"error: data.label_column: row 0 of the test split of '{data}' has the label -1, not one of the "
                    "3 classes 0..2 (its ClassLabel); -1 marks an unlabelled row on the Hub: give the dataset a "
                    "labelled validation split")


def test_a_label_beyond_its_classlabel_is_refused_naming_split_row_and_value(tmp_path, capsys):
    names = datasets.ClassLabel(names=["cat", "dog", "fox"])
    data = hf_dataset(tmp_path / "data", {"train": [0, 1, 2, 7], "validation": [0, 1, 2]}, label=names)
    line = refusal(fit_on(tmp_path, data), capsys)
    assert line == (f"error: data.label_column: row 3 of the train split of '{data}' has the label 7, not one of the "
                    "3 classes 0..2 (its ClassLabel)")


def parquet_dataset(folder: Path, train: list[int]) -> Path:
    saved = datasets.load_from_disk(str(hf_dataset(folder.parent / "saved", {"train": train, "validation": [0, 1]})))
    (folder / "data").mkdir(parents=True)
    for name, split in saved.items():
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    return folder


def test_refused_parquet_files_leave_no_arrow_copy_in_the_datasets_cache_or_the_temporary_folder(tmp_path, capsys,
                                                                                                 hf_cache):
    data = parquet_dataset(tmp_path / "parquet", [1, 2, 1, 2])
    files = {path: path.read_bytes() for path in data.rglob("*.parquet")}
    line = refusal(fit_on(tmp_path, data), capsys)
    assert line.startswith(f"error: data.label_column: row 0 of the train split of '{data}' has the label 1")
    assert not hf_cache.exists() and not list((tmp_path / "tmp").iterdir())
    assert {path: path.read_bytes() for path in data.rglob("*.parquet")} == files


def test_parquet_files_are_read_from_one_temporary_arrow_copy_that_the_last_process_removes_at_exit(
        tmp_path, capsys, hf_cache, monkeypatch):
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda function, *args: at_exit.append((function, args)))
    data = parquet_dataset(tmp_path / "parquet", [0, 1, 0, 1])
    for _ in range(2):  # as two processes of a DDP run: loaded whole, then refused at setup (no such cache)
        line = refusal([*fit_on(tmp_path, data), f"--data.teacher_cache={tmp_path / 'none'}"], capsys)
        assert line.startswith(f"error: data.teacher_cache: '{tmp_path / 'none'}' is not a teacher cache")
    assert not hf_cache.exists()
    copies = list((tmp_path / "tmp").iterdir())
    assert len(copies) == 1 and list(copies[0].rglob("*.arrow")) and len(at_exit) == 2
    (first, args), (last, last_args) = at_exit
    first(*args)  # one process exits: the other still reads the copy
    assert list(copies[0].rglob("*.arrow"))
    last(*last_args)
    assert not list((tmp_path / "tmp").iterdir())


# ---------------------------------------------------------------------------------------------
# The teacher cache


def cache_args(tmp_path: Path, images: Path, teacher: Path) -> list[str]:
    return [*shrink(tmp_path, "distill.yaml"), f"--data.dataset={images}", "--data.batch_size=4",
            f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher}",
            "--model.teacher.init_args.precision=32", "--model.feature_weight=0"]  # a cache holds no features


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(cache, images, teacher): 1 epoch of 18 views of a 3-class folder, top-2, built once for this file."""
    tmp = tmp_path_factory.mktemp("cache_build")
    images = make_image_folder(tmp / "images")
    teacher = random_teacher_file(tmp, num_classes=3)
    cli_main(["cache-teacher", *cache_args(tmp, images, teacher), "--epochs=1", "--top_k=2", f"--out={tmp / 'cache'}"])
    return tmp / "cache", images, teacher


def damaged(built_cache: tuple[Path, Path, Path], tmp_path: Path, name: str, value: float) -> tuple[Path, dict]:
    """A copy of the cache with `value` written into `name`.npy at epoch 0, row 5, top-2; and its files' hashes."""
    cache = Path(shutil.copytree(built_cache[0], tmp_path / "cache"))
    array = np.load(cache / "shard-00000-of-00001" / f"{name}.npy", mmap_mode="r+")
    array[0, 5, 1] = value
    array.flush()
    del array
    return cache, hashes(cache)


def hashes(folder: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("name, value, holds", [
    ("index", 3, "the class 3 at epoch 0, row 5 (image {image}), top-2 (accepted: 0..2)"),
    ("prob", float("nan"), "the probability nan at epoch 0, row 5 (image {image}), top-2 (accepted: a finite number in "
                           "0..1)"),
])
def test_a_cache_with_a_class_out_of_range_or_a_nan_probability_is_refused_by_check_and_by_fit(
        built_cache, tmp_path, capsys, name, value, holds):
    cache, before = damaged(built_cache, tmp_path, name, value)
    image = int(np.load(cache / "shard-00000-of-00001" / "view.npy")[0, 5])
    expected = (f"'{cache / 'shard-00000-of-00001' / name}.npy' holds {holds.format(image=image)}; the cache is "
                "damaged: rebuild it with distill cache-teacher")
    assert refusal(["cache-teacher", f"--check={cache}"], capsys) == f"error: --check: {expected}"
    _, images, teacher = built_cache
    fit = ["fit", *cache_args(tmp_path, images, teacher), f"--data.teacher_cache={cache}", "--model.teacher=null"]
    assert refusal(fit, capsys) == f"error: data.teacher_cache: {expected}"
    assert nothing_written(tmp_path) and hashes(cache) == before  # refused before any epoch, the cache untouched


def test_check_refuses_probabilities_out_of_order_but_passes_the_cache_as_built(built_cache, tmp_path, capsys):
    cli_main(["cache-teacher", f"--check={built_cache[0]}"])
    assert "complete, 18 views (1 epochs x 18), 1 shard(s), top-2 of 3 classes" in capsys.readouterr().out
    cache, _ = damaged(built_cache, tmp_path, "prob", 0.99)  # the second most probable above the first
    line = refusal(["cache-teacher", f"--check={cache}"], capsys)
    assert "prob.npy' holds the probability 0.99 above the one before it at epoch 0, row 5 (image" in line
    assert line.endswith("top-2 (accepted: most probable first); the cache is damaged: rebuild it with distill "
                         "cache-teacher")


@pytest.mark.parametrize("damage", ["edited-epochs", "truncated-array"])
def test_a_damaged_teacher_cache_is_named_when_it_is_opened(tmp_path, capsys, damage):
    args = distill_args(tmp_path)
    cache = tmp_path / "cache"
    cli_main(["cache-teacher", *args[1:], "--epochs=1", "--top_k=2", f"--out={cache}"])
    if damage == "edited-epochs":
        meta = json.loads((cache / "meta.json").read_text())
        meta["epochs"] = 3
        (cache / "meta.json").write_text(json.dumps(meta))
        expected = "shard-00000-of-00001/view.npy' holds int32 (1, 1436), but meta.json describes int32 (3, 1436)"
    else:
        data = (cache / "shard-00000-of-00001" / "index.npy").read_bytes()
        (cache / "shard-00000-of-00001" / "index.npy").write_bytes(data[:200])
        expected = "index.npy' cannot be read"
    line = run_cli_error([*args, f"--data.teacher_cache={cache}", "--model.teacher=null",
                          "--model.feature_weight=0", f"--checkpoint.dirpath={tmp_path / 'ckpt2'}"], capsys)
    assert expected in line and "rebuild" in line


def test_a_cache_that_does_not_fit_on_the_disk_is_refused_before_the_build_and_leaves_nothing(tmp_path, capsys,
                                                                                               monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache = tmp_path / "cache"
    line = run_cli_error(["cache-teacher", *distill_args(tmp_path)[1:], "--epochs=1", "--top_k=2", f"--out={cache}"],
                         capsys)
    assert "--out: cannot allocate" in line and "No space left on device" in line
    assert not cache.exists() and not Path(f"{cache}.partial").exists()


# ---------------------------------------------------------------------------------------------
# The data by its content: a cache and a resume read the images, not their names


def swap_two_images(images: Path) -> None:
    """Two training images of different classes exchange their pixels; every file name stays."""
    first, second = sorted((images / "train" / "cat").iterdir())[0], sorted((images / "train" / "dog").iterdir())[0]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def test_a_teacher_cache_is_refused_for_a_folder_of_the_same_file_names_and_other_pixels(built_cache, tmp_path,
                                                                                        capsys):
    cache, images, teacher = built_cache
    other = Path(shutil.copytree(images, tmp_path / "images"))
    swap_two_images(other)
    fit = ["fit", *cache_args(tmp_path, other, teacher), f"--data.teacher_cache={cache}", "--model.teacher=null"]
    line = refusal(fit, capsys)
    assert line.startswith(f"error: data.teacher_cache: '{cache}' was built for another dataset ('18 files, sha256 ")
    assert nothing_written(tmp_path)


def test_a_data_folder_is_its_files_content_a_copy_elsewhere_the_same_and_unchanged_files_are_not_read_again(
        tmp_path, monkeypatch):
    from distill.common import digests

    images = make_image_folder(tmp_path / "images")
    digest = digests.folder_digest(images)
    copy = Path(shutil.copytree(images, tmp_path / "elsewhere" / "copy"))
    (copy / "train" / ".DS_Store").write_text("a viewer's file, not an image")
    (copy / "train" / "cat" / "broken.png").symlink_to(tmp_path / "gone.png")  # holds no data: left out, not an error
    os.mkfifo(copy / "train" / "cat" / "pipe.png")  # never opened (reading it would wait forever)
    assert digests.folder_digest(copy) == digest
    reads = []
    real = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda path: reads.append(path) or real(path))
    assert digests.folder_digest(copy) == digest and reads == []  # remembered: listed, not read
    swap_two_images(copy)
    assert digests.folder_digest(copy) != digest and len(reads) == 2  # only the two rewritten files are read
    regenerated = make_image_folder(tmp_path / "regenerated", per_class=6)
    (regenerated / "train" / "cat" / "0.png").write_bytes(b"another seed's pixels")
    assert digests.folder_digest(regenerated) != digest


def test_resuming_after_images_were_added_to_a_class_is_refused_and_the_run_is_kept(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images")
    args = [*fit_on(tmp_path, images), "--trainer.max_epochs=1"]
    cli_main(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").glob("*.ckpt")}
    shutil.copy(images / "train" / "cat" / "0.png", images / "train" / "cat" / "added.png")
    line = refusal([*args, "--ckpt_path=last", "--trainer.max_epochs=2"], capsys)
    assert line.startswith("error: ckpt_path: 'last'") and "data.dataset: its content changed (sha256 " in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").glob("*.ckpt")} == before


@pytest.mark.parametrize("where", ["read_only_folder", "full_disk"])
def test_cache_teacher_onto_a_full_disk_or_into_a_read_only_folder_is_one_line_and_leaves_nothing(tmp_path, capsys,
                                                                                                  request, where):
    folder = request.getfixturevalue(where)
    before = files_under(folder)
    line = refusal(["cache-teacher", *distill_args(tmp_path)[1:], "--epochs=1", "--top_k=2",
                    f"--out={folder / 'new' / 'cache'}"], capsys)
    assert line.startswith("error: cache-teacher --out") and str(folder) in line
    assert ("Read-only file system" if where == "read_only_folder" and os.geteuid() == 0 else
            "Permission denied" if where == "read_only_folder" else "No space left on device") in line
    assert files_under(folder) == before and not (folder / "new").exists()


def test_a_folder_named_by_an_option_counts_by_its_files_so_a_teacher_exported_again_is_another_teacher(tmp_path):
    from distill.common.identity import options_identity

    teacher = tmp_path / "teacher_export"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"architecture": "resnet10t"}')
    (teacher / "model.safetensors").write_bytes(b"weights of the first export")
    before = options_identity({"model": {"teacher": {"init_args": {"weights": str(teacher)}}}})
    copy = Path(shutil.copytree(teacher, tmp_path / "copied" / "teacher_export"))
    assert options_identity({"model": {"teacher": {"init_args": {"weights": str(copy)}}}}) == before  # moved: same
    (teacher / "model.safetensors").write_bytes(b"weights of an export of another checkpoint")
    assert options_identity({"model": {"teacher": {"init_args": {"weights": str(teacher)}}}}) != before
