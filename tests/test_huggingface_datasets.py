"""A Hugging Face `datasets` dataset on disk trains like a folder: its views replay, its teacher cache is accepted."""
import json
from pathlib import Path

import pytest
import torch

from distill.cli import cli_main
from distill.common.errors import UserError
from distill.training.datamodule import ImageDataModule
from distill.commands.export import Int8, export_student
from tests.helpers import TINY_TEACHER, make_image_folder, random_teacher_file, scalars, shrink

datasets = pytest.importorskip("datasets")

CLASSES = ("cat", "dog", "fox")
AUGMENT = {"img_size": 32, "batch_size": 8, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5, "mixup": 0.8,
           "cutmix": 1.0}


def rows(folder: Path, split: str) -> dict[str, list]:
    """The images of an ImageFolder split as the Hub stores them: encoded bytes, and a class index."""
    files = sorted((folder / split).rglob("*.png"))
    return {"image": [{"bytes": path.read_bytes(), "path": None} for path in files],
            "label": [CLASSES.index(path.parent.name) for path in files]}


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory) -> dict[str, Path]:
    """The same 3-class images as `save_to_disk` wrote them and as Hub-style parquet files (data/<split>-*.parquet)."""
    tmp = tmp_path_factory.mktemp("hf")
    folder = make_image_folder(tmp / "folder", CLASSES, per_class=8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict(rows(folder, split), features=features)
                                   for name, split in (("train", "train"), ("validation", "val"))})
    splits.save_to_disk(str(tmp / "saved"))
    renamed = datasets.DatasetDict({name: split.rename_columns({"image": "img", "label": "labels"})
                                    for name, split in splits.items()})
    renamed.save_to_disk(str(tmp / "renamed"))  # columns of its own, as a user's dataset may have
    (tmp / "parquet" / "data").mkdir(parents=True)
    for name, split in splits.items():
        split.to_parquet(str(tmp / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    return {"saved": tmp / "saved", "parquet": tmp / "parquet", "folder": folder, "renamed": tmp / "renamed"}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # parquet is converted there, not in ~/.cache


def test_a_saved_dataset_trains_from_its_teacher_cache_whose_views_replay_exactly(hf_data, tmp_path):
    teacher = random_teacher_file(tmp_path, num_classes=len(CLASSES))
    args = [*shrink(tmp_path, "distill.yaml"), f"--data.dataset={hf_data['renamed']}", "--data.batch_size=8",
            "--data.image_column=img", "--data.label_column=labels",
            f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher}",
            "--model.teacher.init_args.precision=32", "--trainer.max_epochs=2", "--model.feature_weight=0"]
    cli_main(["cache-teacher", *args, "--epochs=2", "--top_k=2", f"--out={tmp_path / 'cache'}"])
    # another worker count and batch size than the build: every view and target checked against the live teacher
    cli_main(["fit", *args, f"--data.teacher_cache={tmp_path / 'cache'}", "--data.num_workers=2", "--data.batch_size=4",
              "--model.teacher_cache_verify=1.0"])
    logged = scalars(tmp_path / "runs")
    assert logged["train/cache_view_match_step"] == [1.0] * 6 and logged["train/cache_agreement_step"] == [1.0] * 6
    # the INT8 export calibrates on the recorded dataset, read with the run's own column names
    export_student(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export", torchscript=False,
                   int8=Int8(calibration_images=8, max_drop=100.0, method="static"))
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())["formats"]["int8"]
    assert report["validation_images"] == 3 * 8 and report["calibration_images"] == 8


def test_parquet_files_give_the_classes_and_views_of_the_saved_dataset_and_of_the_folder(hf_data):
    modules = {name: ImageDataModule(str(hf_data[name]), num_workers=0, **AUGMENT) for name in ("saved", "parquet", "folder")}
    for data in modules.values():
        data.setup("fit")
    assert modules["saved"].class_names == modules["parquet"].class_names == list(CLASSES)
    assert len(modules["parquet"].val_set) == len(modules["folder"].val_set) == 3 * 8
    for key in [(0, 0), (3, 5), (7, 23)]:  # (epoch, index): a view is a function of the seed, epoch and index
        views = [modules[name].train_set[key]["image"] for name in ("saved", "parquet", "folder")]
        assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])
    fingerprints = [modules[name].cache_fingerprint(modules[name].train_set.dataset) for name in ("saved", "parquet")]
    assert fingerprints[0]["classes"] == fingerprints[1]["classes"]


@pytest.mark.parametrize("option, value, message", [
    ("image_column", "img", r"data.image_column: the train split of '.*' has no column 'img'; its columns are \['image', 'label'\]"),
    ("label_column", "image", "data.label_column: 'image' of '.*' holds Image"),
])
def test_a_wrong_column_is_one_line_naming_the_columns(hf_data, option, value, message):
    with pytest.raises(UserError, match=message):
        ImageDataModule(str(hf_data["saved"]), **{option: value})


def test_without_a_validation_split_the_splits_are_named(hf_data, tmp_path):
    only_train = tmp_path / "only_train"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(hf_data["saved"]))["train"]}).save_to_disk(str(only_train))
    with pytest.raises(UserError, match=r"has the splits \['train'\]; expected train and one of validation, val, test"):
        ImageDataModule(str(only_train))


def test_without_the_datasets_library_the_extra_to_install_is_named(hf_data, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match=r"is a Hugging Face dataset; reading it needs pip install -e \"\.\[hf\]\""):
        ImageDataModule(str(hf_data["parquet"]))
