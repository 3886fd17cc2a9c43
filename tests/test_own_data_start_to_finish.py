"""A user's own image folder to a served student with README's commands, as a newcomer meets it: two datasets in
a row, each in its own folder named after it, nothing refused, nothing overwritten, a re-run that skips what is
done, a verdict on whether the data was learned, and the served student answering."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import FormData, Headers, UploadFile

from distill.cli import cli_main
from distill.commands.serve import StudentAPI, describe_export
from tests.helpers import ROOT, files_under

# the real configs, shrunk to one short epoch per stage (the options after the config go to every stage)
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
         "--data.num_workers=0"]


def own_images(root: Path, classes: tuple[str, ...], seed: int) -> Path:
    """5 classes of 40 training and 8 validation images, each class its own colour and stripe: a user's folder."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 40), ("val", 8)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (36, 36, 3), dtype=np.uint8)
                pixels[..., index % 3] += 120
                pixels[4 * index:4 * index + 4] = 255
                Image.fromarray(pixels).save(folder / f"img_{i}.jpg")
    return root


def form(image: bytes) -> FormData:
    """A multipart upload of `image` in the field `image`, as `curl -F image=@file` sends it."""
    upload = UploadFile(io.BytesIO(image), filename="picture.jpg", headers=Headers({"content-type": "image/jpeg"}))
    return FormData([("image", upload)])


def test_two_datasets_go_to_two_served_students_and_a_rerun_skips_what_is_done(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # a user's working folder: runs/ is made here
    first = own_images(tmp_path / "flowers", ("daisy", "rose", "tulip", "iris", "lily"), seed=1)
    second = own_images(tmp_path / "tools", ("hammer", "saw", "drill", "wrench", "pliers"), seed=2)
    pipeline = ["pipeline", "--config", str(ROOT / "configs" / "own_data.yaml")]
    folders = []
    for data in (first, second):
        cli_main([*pipeline, "--data.dataset", str(data), *QUICK])
        printed = capfd.readouterr().out
        folder = next((tmp_path / "runs").glob(f"{data.name}-*"))
        folders.append(folder)
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["export", "student", "teacher"]
        assert f"[pipeline] next: distill serve --export {folder / 'export'}" in printed
        assert "[pipeline] teacher: " in printed and "[pipeline] student: " in printed  # the verdict per stage
    assert folders[0] != folders[1]
    before = files_under(tmp_path / "runs")
    cli_main([*pipeline, "--data.dataset", str(first), *QUICK])  # again: everything is done, nothing is replaced
    printed = capfd.readouterr().out
    assert "teacher: finished earlier, skipped" in printed and "student: finished earlier, skipped" in printed
    assert files_under(tmp_path / "runs") == before

    export = folders[1] / "export"  # `distill serve`'s model behind its HTTP layer (tested in test_serving_and_int8)
    api = StudentAPI(export, "int8")
    api.setup("cpu")
    image = (next((second / "val" / "saw").iterdir())).read_bytes()
    answer = api.encode_response(api.predict(api.decode_request(form(image))))  # what POST /predict answers
    labels = [p["label"] for p in answer["predictions"]]
    assert sorted(labels) == ["drill", "hammer", "pliers", "saw", "wrench"]  # the tools' own class names
    assert answer["backend"] == "int8" and answer["version"] == describe_export(export, "int8")["version"]


def test_a_pipeline_without_a_name_needs_the_data_to_name_it(tmp_path, capsys):
    from tests.helpers import run_cli_error

    line = run_cli_error(["pipeline", "--config", str(ROOT / "configs" / "own_data.yaml")], capsys)
    assert "has no 'name'; give --data.dataset DIR" in line and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("acc, teacher, expected", [
    (0.22, None, "near chance (20.0% for 5 classes): the teacher did not learn the data"),
    (0.60, 0.95, "35.0 points under its teacher"),
    (0.97, 0.95, "learned the data (97.0%, its teacher 95.0%)"),
])
def test_the_verdict_says_whether_a_stage_learned_and_what_to_change(acc, teacher, expected):
    from distill.commands.pipeline import verdict

    metrics = {"val/acc": acc, **({"val/teacher_acc": teacher} if teacher is not None else {})}
    stage = {"name": "s"} if teacher is None else {"name": "s", "teacher_from": "t"}
    (line,) = verdict([{"stage": "s", "metrics": metrics, "epochs": 3}], [stage], classes=5)
    assert expected in line


def test_a_held_out_folder_with_val_alone_is_measured_by_validate_and_refused_by_fit_and_for_other_classes(
        tmp_path, capsys):
    from tests.helpers import distill_args, run_cli_error

    classes = ("daisy", "rose", "tulip", "iris", "lily")
    data = own_images(tmp_path / "flowers", classes, seed=1)
    held_out = own_images(tmp_path / "held_out", classes, seed=3)
    for image in (held_out / "train").rglob("*.jpg"):  # a test set: the images a run never trained or chose on
        image.unlink()
    for folder in sorted((held_out / "train").iterdir()):
        folder.rmdir()
    (held_out / "train").rmdir()
    args = [a for a in distill_args(tmp_path, teacher_classes=5) if a != "--trainer.limit_val_batches=1"]
    cli_main([*args, f"--data.dataset={data}"])
    checkpoint = f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"
    capsys.readouterr()
    before = files_under(tmp_path / "ckpt")
    cli_main(["validate", *args[1:], f"--data.dataset={held_out}", checkpoint, "--trainer.logger=false"])
    assert "val/acc " in capsys.readouterr().out  # measured on val/ of a folder that has no train/
    assert files_under(tmp_path / "ckpt") == before  # nothing written into the run's folder (no config.yaml)
    line = run_cli_error([*args, f"--data.dataset={held_out}", "--checkpoint.dirpath", str(tmp_path / "other")], capsys)
    assert f"'{held_out}' has no train/ folder; training needs train/ and val/" in line
    (held_out / "val" / "rose").rename(held_out / "val" / "poppy")  # as many classes, one of them another
    line = run_cli_error(["validate", *args[1:], f"--data.dataset={held_out}", checkpoint], capsys)
    assert "the checkpoint was trained on other classes than data.dataset's (class 3: 'rose' in the checkpoint" in line
