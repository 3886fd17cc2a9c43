"""The mistakes real users make, each either harmless or refused with one line; nothing earlier is lost.

Every refusal is asserted the same way: exit code 2, exactly one `error:` line naming the option or
file, and the files an earlier run wrote byte-identical afterwards.
"""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from distill.cli import cli_main
from distill.commands.pipeline import finished, load_spec
from distill.common.errors import UserError
from distill.common.files import OutputLock, lock_path, replace_folder
from distill.data.images import UnreadableImage, load_image
from tests.helpers import ROOT, TINY_TEACHER, distill_args, make_image_folder, run_cli_error


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (lock files aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def earlier_run(tmp_path) -> tuple[list[str], dict[str, bytes]]:
    """A finished tiny fit into tmp_path/ckpt: its command line and its checkpoint files."""
    args = distill_args(tmp_path)
    cli_main(args)
    return args, snapshot(tmp_path / "ckpt")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock file `path` (as a running fit, export or cache build does)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distill.common.files import OutputLock\n"
                               f"OutputLock({str(path)!r}, 'x').acquire()\nprint('held', flush=True)\ntime.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ---------------------------------------------------------------------------------------------
# Lost data


def test_running_the_same_fit_again_is_refused_and_keeps_the_earlier_checkpoints(tmp_path, capsys, earlier_run):
    args, before = earlier_run
    line = run_cli_error(args, capsys)
    assert "checkpoint.dirpath:" in line and "earlier run's best.ckpt, last.ckpt" in line
    assert "--ckpt_path last" in line and "--checkpoint.dirpath" in line
    assert snapshot(tmp_path / "ckpt") == before


def test_resuming_the_same_fit_with_ckpt_path_last_is_allowed(tmp_path, earlier_run):
    args, _ = earlier_run
    cli_main([*args, "--ckpt_path=last", "--trainer.max_epochs=2"])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")["epoch"] == 1


def test_resuming_another_runs_checkpoint_into_a_folder_of_a_third_run_is_refused(tmp_path, capsys, earlier_run):
    args, before = earlier_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.ckpt").write_bytes((tmp_path / "ckpt" / "last.ckpt").read_bytes())
    line = run_cli_error([*args, f"--ckpt_path={other / 'last.ckpt'}"], capsys)
    assert "holds another run's" in line and str(other) in line
    assert snapshot(tmp_path / "ckpt") == before


@pytest.mark.parametrize("content", [{"best.ckpt": b"weights"}, {"notes.txt": b"my notes", "model.onnx": b"x"},
                                     {"config.json": b"{}", "model.safetensors": b"someone's model"}],
                         ids=["run-folder", "notes-beside-an-export-file", "a-model-folder-with-export-names"])
def test_export_overwrite_never_deletes_a_folder_that_is_not_an_export(tmp_path, capsys, earlier_run, content):
    out = tmp_path / "precious"
    out.mkdir()
    for name, data in content.items():
        (out / name).write_bytes(data)
    line = run_cli_error(["export", "--ckpt", str(tmp_path / "ckpt" / "best.ckpt"), "--out", str(out), "--overwrite",
                          "--no-onnx", "--no-torchscript"], capsys)
    foreign = "best.ckpt" if "best.ckpt" in content else "notes.txt" if "notes.txt" in content else "no export_report.json"
    assert f"'{out}' is not an export folder (it holds {foreign})" in line
    assert snapshot(out) == content


def test_export_overwrite_replaces_an_earlier_export_and_an_empty_folder(tmp_path, earlier_run):
    best = str(tmp_path / "ckpt" / "best.ckpt")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "export", tmp_path / "export", empty):
        cli_main(["export", "--ckpt", best, "--out", str(out), "--overwrite", "--no-onnx", "--no-torchscript"])
        assert (out / "export_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".old" in p.name or ".tmp" in p.name]


@pytest.mark.parametrize("command", ["fit", "export", "cache-teacher", "predict"])
def test_a_second_writer_of_the_same_output_is_refused_until_the_first_exits(tmp_path, capsys, earlier_run, command):
    args, before = earlier_run
    best = tmp_path / "ckpt" / "best.ckpt"
    if command == "fit":
        lock, retry = tmp_path / "ckpt" / ".lock", [*args, "--ckpt_path=last", "--trainer.max_epochs=2"]
    elif command == "export":
        out = tmp_path / "export"
        lock, retry = lock_path(out), ["export", "--ckpt", str(best), "--out", str(out), "--no-onnx", "--no-torchscript"]
    elif command == "cache-teacher":
        out = tmp_path / "cache"
        lock, retry = lock_path(out), ["cache-teacher", *args[1:], "--checkpoint.dirpath", str(tmp_path / "c2"),
                                       "--epochs=1", "--top_k=2", f"--out={out}"]
    else:
        cli_main(["export", "--ckpt", str(best), "--out", str(tmp_path / "export"), "--no-onnx", "--no-torchscript"])
        images = make_image_folder(tmp_path / "images", per_class=1) / "val"
        out = tmp_path / "predictions.csv"
        lock, retry = lock_path(out), ["predict", "--export", str(tmp_path / "export"), "--images", str(images),
                                       "--out", str(out)]
    holder = hold_lock(lock)
    try:
        line = run_cli_error(retry, capsys)
        assert "is being written by pid" in line and str(lock) in line
        assert snapshot(tmp_path / "ckpt") == before
    finally:
        holder.send_signal(signal.SIGKILL)  # the first writer crashes: its lock must not stay stuck
        holder.wait()
    cli_main(retry)


# ---------------------------------------------------------------------------------------------
# Silent wrong results


def broken_teacher(tmp_path: Path, how: str) -> Path:
    """A test_resnet weights file whose weights (nan) or whose outputs (a negative BatchNorm variance) are not finite."""
    import timm
    state = timm.create_model(TINY_TEACHER, num_classes=10).state_dict()
    if how == "weights":
        state["fc.weight"][0, 0] = float("nan")
    else:
        state["bn1.running_var"].fill_(-1.0)  # sqrt(-1): every output NaN, every weight finite
    path = tmp_path / f"teacher_{how}.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("how", ["weights", "outputs"])
def test_a_teacher_that_is_not_finite_stops_the_run_naming_the_teacher(tmp_path, capsys, how):
    args = [*distill_args(tmp_path), f"--model.teacher.init_args.weights={broken_teacher(tmp_path, how)}"]
    line = run_cli_error(args, capsys)
    assert f"teacher '{TINY_TEACHER}'" in line and ("outputs on the first batch are not finite" if how == "outputs"
                                                    else "weights") in line
    assert ("non-finite" if how == "weights" else "not finite") in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, capsys):
    line = run_cli_error([*distill_args(tmp_path), "--data.batch_size=2000"], capsys)
    assert "data.batch_size 2000 is larger than the 1436 training images each of the 1 process(es)" in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_a_run_that_took_no_optimiser_step_fails_and_writes_no_result(tmp_path, capsys):
    result = tmp_path / "result.json"
    line = run_cli_error([*distill_args(tmp_path), "--trainer.limit_train_batches=0", f"--metrics_json={result}"], capsys)
    assert "fit: the run took no optimiser step" in line and "nothing was trained" in line
    assert not result.exists()


def test_the_pipeline_counts_a_stage_finished_only_when_it_trained_and_its_checkpoint_exists(tmp_path):
    best = tmp_path / "best.ckpt"
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"steps": 0, "best_checkpoint": str(best)}))
    best.write_bytes(b"x")
    assert finished(result) is None  # trained nothing
    result.write_text(json.dumps({"steps": 12, "best_checkpoint": str(tmp_path / "gone.ckpt")}))
    assert finished(result) is None  # its checkpoint is missing
    result.write_text(json.dumps({"steps": 12, "best_checkpoint": str(best)}))
    assert finished(result)["steps"] == 12


def test_resuming_mid_epoch_with_another_batch_size_is_refused_naming_both(tmp_path, capsys):
    args = [*distill_args(tmp_path), "--trainer.limit_train_batches=4", "--trainer.max_steps=2"]  # stops mid-epoch
    cli_main(args)
    before = snapshot(tmp_path / "ckpt")
    line = run_cli_error([*args, "--ckpt_path=last", "--trainer.max_steps=4", "--data.batch_size=32"], capsys)
    assert "was saved by a run with other options (data.batch_size: 64 -> 32" in line  # a result of other options
    assert snapshot(tmp_path / "ckpt") == before
    cli_main([*args, "--ckpt_path=last", "--trainer.max_steps=4"])  # the same batch size resumes


def test_16_bit_and_float_images_are_read_by_their_range_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "16bit.png")  # mode I;16: convert("RGB") would give white
    Image.fromarray((ramp / 65535.0).astype(np.float32), mode="F").save(tmp_path / "float.tiff")  # black by convert
    for name in ("16bit.png", "float.tiff"):
        grey = np.asarray(load_image(tmp_path / name))[..., 0].astype(int)
        assert np.abs(grey - np.rint(ramp / 257.0)).max() <= 1, name
    Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), mode="F").save(tmp_path / "odd.tiff")
    with pytest.raises(UnreadableImage, match=r"float image with values in \[300, 300\]; expected \[0, 1\] or \[0, 255\]"):
        load_image(tmp_path / "odd.tiff")


def test_a_transparent_background_becomes_white_not_black(tmp_path):
    glyph = np.zeros((6, 6, 4), dtype=np.uint8)  # transparent black everywhere...
    glyph[2:4, 2:4] = (0, 0, 0, 255)  # ...but an opaque black square
    Image.fromarray(glyph, mode="RGBA").save(tmp_path / "glyph.png")
    pixels = np.asarray(load_image(tmp_path / "glyph.png"))
    assert (pixels[0, 0] == 255).all() and (pixels[2, 2] == 0).all()


def test_a_photo_taken_sideways_is_read_upright_by_its_exif_orientation(tmp_path):
    stored = np.zeros((4, 6, 3), dtype=np.uint8)  # stored 6 wide, 4 high, a white top-left pixel
    stored[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    upright, plain = np.asarray(load_image(tmp_path / "sideways.png")), np.asarray(load_image(tmp_path / "plain.png"))
    assert upright.shape == (6, 4, 3) and (upright[0, -1] == 255).all()  # the top-left corner went top-right
    assert np.array_equal(plain, stored)


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path, recwarn):
    from distill.data.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / ".ipynb_checkpoints" / "x.png").write_bytes(b"not an image")
    (root / "train" / "cat" / ".thumbs").mkdir()
    (root / "train" / "cat" / ".thumbs" / "0.png").write_bytes(b"not an image")
    (root / "train" / "cat" / "._0.png").write_bytes(b"macOS resource fork")
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    assert data.class_names == ["cat", "dog", "fox"]
    assert len(data.train_set) == 18
    list(data.train_dataloader())
    assert not [w for w in recwarn if "skipped unreadable image" in str(w.message)]


def test_files_left_out_for_their_extension_are_named_not_dropped_silently(tmp_path):
    from distill.data.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "scan.gif")
    (root / "train" / "dog" / "labels.txt").write_text("dog")
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    with pytest.warns(UserWarning, match=r"left out 2 file\(s\) under .*train.* \(\.gif, \.txt; e\.g\. .*scan\.gif"):
        data.setup("fit")
    assert len(data.train_set) == 18


@pytest.mark.parametrize("option, value, accepted", [
    ("model.ema_decay", "1.5", "> 0 and < 1 or null"),
    ("model.label_smoothing", "1", ">= 0 and < 1"),
    ("model.label_smoothing", "-0.1", ">= 0 and < 1"),
    ("model.alpha", "1.5", ">= 0 and <= 1"),
    ("model.tau", "0", "> 0"),
    ("data.batch_size", "0", "> 0"),
    ("data.re_prob", "2", ">= 0 and <= 1"),
    ("model.student.init_args.drop_path_rate", "1", ">= 0 and < 1"),
])
def test_an_out_of_range_number_is_refused_with_its_range(tmp_path, capsys, option, value, accepted):
    line = run_cli_error([*distill_args(tmp_path), f"--{option}={value}"], capsys)
    assert f"{option}: {value} is out of range (accepted: {accepted})" in line
    assert not (tmp_path / "ckpt").exists()


def test_help_shows_each_numbers_range(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    text = capsys.readouterr().out
    for option, kind in (("--model.ema_decay", "OpenUnitInterval"), ("--model.label_smoothing", "HalfOpenUnitInterval"),
                         ("--data.batch_size", "PositiveInt"), ("--model.alpha", "ClosedUnitInterval")):
        start = text.rindex(f"  {option} ")  # its entry in the options list, not the usage summary
        assert kind in text[start:text.index("\n  --", start + 1)], option


# ---------------------------------------------------------------------------------------------
# Plain mistakes that used to print a traceback or an unclear message


def test_the_pipeline_reads_its_stage_configs_relative_to_its_own_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the repository
    spec = load_spec(ROOT / "configs" / "pipeline.yaml")
    assert [Path(s["config"]) for s in spec["stages"]] == [
        ROOT / "configs" / "teacher.yaml", ROOT / "configs" / "distill.yaml", ROOT / "configs" / "distill.yaml"]
    moved = tmp_path / "elsewhere" / "pipeline.yaml"
    moved.parent.mkdir()
    moved.write_text((ROOT / "configs" / "pipeline.yaml").read_text())
    with pytest.raises(UserError, match="stage teacher: config 'teacher.yaml' does not exist .*relative to the pipeline"):
        load_spec(moved)


def test_an_image_over_the_decompression_bomb_limit_is_skipped_in_training_and_predict(tmp_path, monkeypatch,
                                                                                        earlier_run):
    from distill.data.datamodule import ImageDataModule
    from distill.deploy.predict import predict_folder

    root = make_image_folder(tmp_path / "images")
    Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8)).save(root / "train" / "cat" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # 200 x 200 is over twice the limit: DecompressionBombError
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    with pytest.warns(UserWarning, match="bomb.png' .*decompression-bomb limit"):
        list(data.train_dataloader())
    cli_main(["export", "--ckpt", str(tmp_path / "ckpt" / "best.ckpt"), "--out", str(tmp_path / "export"),
              "--no-onnx", "--no-torchscript"])
    images, unreadable = predict_folder(tmp_path / "export", root / "train", tmp_path / "p.csv")
    assert (images, unreadable) == (19, 1)


def test_a_class_folder_named_in_another_encoding_trains_and_draws_its_confusion_matrix(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("a", "b"))
    for split in ("train", "val"):
        os.rename(root / split / "b", os.path.join(os.fsencode(root / split), b"caf\xe9"))  # Latin-1, not UTF-8
    args = [*distill_args(tmp_path, teacher_classes=2), f"--data.dataset={root}", "--data.batch_size=4",
            "--telemetry.confusion_matrix=true"]
    cli_main(args)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["hyper_parameters"]["class_names"] == ["a", "caf\\xe9"]


def test_predict_skips_an_unreadable_image_and_reports_it_in_the_csv_and_at_the_end(tmp_path, capsys, earlier_run):
    cli_main(["export", "--ckpt", str(tmp_path / "ckpt" / "best.ckpt"), "--out", str(tmp_path / "export"),
              "--no-onnx", "--no-torchscript"])
    images = make_image_folder(tmp_path / "images", per_class=2) / "val"
    (images / "dog" / "0.png").write_bytes(b"truncated")
    Image.new("RGB", (8, 8)).save(images / "cat" / "animated.gif")  # not an ImageFolder extension: left out, said
    out = tmp_path / "predictions.csv"
    cli_main(["predict", "--export", str(tmp_path / "export"), "--images", str(images), "--out", str(out)])
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].endswith(",error")
    bad = [r for r in rows if "dog/0.png" in r][0]
    assert bad.split(",")[-1].startswith("UnidentifiedImageError") and ",," in bad
    printed = capsys.readouterr()
    assert "1 image(s) could not be read" in printed.out
    assert "left out 1 file(s)" in printed.err and "animated.gif" in printed.err
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("problem", ["top_k", "no-weights", "truncated-weights", "existing-out"])
def test_predict_mistakes_are_one_line(tmp_path, capsys, earlier_run, problem):
    export = tmp_path / "export"
    cli_main(["export", "--ckpt", str(tmp_path / "ckpt" / "best.ckpt"), "--out", str(export), "--no-onnx",
              "--no-torchscript"])
    images = make_image_folder(tmp_path / "images", per_class=1) / "val"
    out = tmp_path / "predictions.csv"
    extra = []
    if problem == "top_k":
        extra, expected = ["--top_k", "0"], "distill predict: --top_k: 0 is out of range (accepted: > 0)"
    elif problem == "no-weights":
        (export / "model.safetensors").unlink()
        expected = "has no model.safetensors; it is not a (whole) export folder"
    elif problem == "truncated-weights":
        data = (export / "model.safetensors").read_bytes()
        (export / "model.safetensors").write_bytes(data[: len(data) // 2])
        expected = "could not be loaded"
    else:
        out.write_text("yesterday's predictions")
        expected = "predictions.csv' exists; pass --overwrite"
    line = run_cli_error(["predict", "--export", str(export), "--images", str(images), "--out", str(out), *extra],
                         capsys)
    assert expected in line
    assert out.read_text() == "yesterday's predictions" if problem == "existing-out" else not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


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
                          f"--checkpoint.dirpath={tmp_path / 'ckpt2'}"], capsys)
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


@pytest.mark.parametrize("content, expected", [
    ("", "a config must be a mapping of options (model:, data:, trainer:, ...) but the file is empty"),
    ("- model\n- data\n", "but the file holds a list"),
    ("model:\n\tlr: 0.1\n", "not valid YAML at line 2, column 1"),
])
def test_a_config_file_that_is_not_a_mapping_of_options_is_named(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    line = run_cli_error([*distill_args(tmp_path), "--config", str(bad)], capsys)
    assert f"{bad}: " in line and expected in line


def test_an_export_folder_without_weights_given_as_the_teacher_is_named(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    line = run_cli_error([*distill_args(tmp_path), f"--model.teacher.init_args.weights={folder}"], capsys)
    assert f"teacher.weights: folder '{folder}' is not a timm model folder" in line and "config.json" in line


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, capsys, monkeypatch,
                                                                                     earlier_run):
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    args, before = earlier_run

    def disk_full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    line = run_cli_error([*args, "--ckpt_path=last", "--trainer.max_epochs=2"], capsys)
    assert "checkpoint.dirpath: no space left to write" in line and "previous checkpoint there is intact" in line
    assert snapshot(tmp_path / "ckpt") == before


def test_a_failed_folder_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target, new = tmp_path / "export", tmp_path / ".export.tmp"
    target.mkdir()
    (target / "model.safetensors").write_text("yesterday")
    new.mkdir()
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        replace_folder(new, target)
    assert (target / "model.safetensors").read_text() == "yesterday"
    assert [p.name for p in tmp_path.iterdir() if ".old" in p.name] == []


# ---------------------------------------------------------------------------------------------
# One rule: bad input is one line, a bug keeps its traceback


def test_a_bug_keeps_its_traceback_even_when_it_is_a_value_error(tmp_path, monkeypatch):
    from distill.training.module import DistillationModule

    def shape_bug(self, batch, batch_idx):
        raise ValueError("mat1 and mat2 shapes cannot be multiplied (64x10 and 12x10)")

    monkeypatch.setattr(DistillationModule, "training_step", shape_bug)
    with pytest.raises(ValueError, match="shapes cannot be multiplied"):
        cli_main(distill_args(tmp_path))


def test_a_lock_held_by_this_process_is_released_when_a_command_fails(tmp_path, capsys):
    run_cli_error([*distill_args(tmp_path), "--data.batch_size=2000"], capsys)  # fails after taking the lock
    with OutputLock(tmp_path / "ckpt" / ".lock", "x"):
        pass



# ---------------------------------------------------------------------------------------------
# Found by trying the tool as a hostile user (the list above was a sample)


def test_a_diverged_student_is_never_saved_as_a_checkpoint(tmp_path, capsys):
    # one step at an infinite rate: the loss of that step is finite, the weights after it are not
    line = run_cli_error([*distill_args(tmp_path), "--trainer.max_steps=1", "--model.lr=inf", "--model.warmup_epochs=0"],
                         capsys)
    assert "training diverged: the student's weights hold NaN or inf at epoch 0" in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_resuming_from_a_checkpoint_file_with_other_hyper_parameters_is_refused(tmp_path, capsys, earlier_run):
    args, before = earlier_run
    line = run_cli_error([*args, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", "--trainer.max_epochs=2",
                          "--model.alpha=0.9"], capsys)
    assert "was saved by a run with other options (model.alpha: 0.5 -> 0.9" in line and "model.init_from" in line
    assert snapshot(tmp_path / "ckpt") == before
    cli_main([*args, f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", "--trainer.max_epochs=2", "--model.alpha=0.5"])


def test_an_existing_metrics_json_is_not_replaced_by_a_run_that_resumes_nothing(tmp_path, capsys):
    precious = tmp_path / "precious.json"
    precious.write_text('{"mine": 1}')
    line = run_cli_error([*distill_args(tmp_path), "--ckpt_path=last", f"--metrics_json={precious}"], capsys)
    assert f"metrics_json: '{precious}' exists and this run resumes nothing" in line
    assert precious.read_text() == '{"mine": 1}'


@pytest.mark.parametrize("option, message", [
    ("--seed_everything=-1", "seed_everything: -1 is out of range"),
    ("--trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches: 0 is out of range (accepted: 1 or more)"),
    ("--trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch: 0 is out of range"),
    ("--trainer.val_check_interval=0", "trainer.val_check_interval: 0 is out of range"),
    ("--trainer.devices=0", "trainer: "),
    ("--checkpoint.monitor=val/accc", "checkpoint.monitor: 'val/accc' is not a metric this run logs; did you mean 'val/acc'"),
    ("--model.optimizer=adamww", "model.optimizer: 'adamww' is not a timm optimiser; did you mean adamw"),
    ("--data.auto_augment=rand-x9", "data.auto_augment: 'rand-x9' is not a timm augmentation policy"),
    ("--data.auto_augment=rand-zz", "data.auto_augment: 'rand-zz' is not a timm augmentation policy"),
    ("--model.student.init_args.model_name=resnet10t", "student 'resnet10t' does not take patch_size"),
    ("--telemetry.augmented_images=-1", "telemetry.augmented_images: -1 is out of range"),
])
def test_options_lightning_or_timm_would_reject_with_a_traceback_are_one_line(tmp_path, capsys, option, message):
    line = run_cli_error([*distill_args(tmp_path), option], capsys)
    assert message in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_a_symbolic_link_back_up_the_tree_does_not_repeat_images_under_another_class(tmp_path):
    from distill.data.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    (root / "train" / "cat" / "back").symlink_to(root / "train")  # a loop through every class
    data = ImageDataModule(str(root), img_size=32, batch_size=2, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    assert len(data.train_set) == 18


@pytest.mark.parametrize("command", ["export", "predict", "report"])
def test_an_output_below_a_file_is_one_line(tmp_path, capsys, earlier_run, command):
    blocker = tmp_path / "a_file.png"
    blocker.write_bytes(b"not a folder")
    if command == "export":
        args = ["export", "--ckpt", str(tmp_path / "ckpt" / "best.ckpt"), "--out", str(blocker / "x")]
        expected = "is a file, so"
    elif command == "predict":
        cli_main(["export", "--ckpt", str(tmp_path / "ckpt" / "best.ckpt"), "--out", str(tmp_path / "export"),
                  "--no-onnx", "--no-torchscript"])
        images = make_image_folder(tmp_path / "images", per_class=1) / "val"
        args = ["predict", "--export", str(tmp_path / "export"), "--images", str(images), "--out", str(blocker / "p.csv")]
        expected = "cannot create folder"
    else:
        args, expected = ["report", str(tmp_path / "runs"), "--plot", str(blocker / "plots")], "cannot create folder"
    assert expected in run_cli_error(args, capsys)
    assert blocker.read_bytes() == b"not a folder"


def test_report_plots_do_not_replace_other_runs_plots_unless_asked(tmp_path, capsys, earlier_run):
    plots = tmp_path / "plots"
    cli_main(["report", str(tmp_path / "runs"), "--plot", str(plots)])
    before = snapshot(plots)
    assert "exists; pass --overwrite" in run_cli_error(["report", str(tmp_path / "runs"), "--plot", str(plots)], capsys)
    assert snapshot(plots) == before
    cli_main(["report", str(tmp_path / "runs"), "--plot", str(plots), "--overwrite"])


def test_a_key_given_twice_in_a_config_is_named(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("data:\n  batch_size: 16\nmodel:\n  lr: 0.001\ndata:\n  num_workers: 0\n")
    line = run_cli_error([*distill_args(tmp_path), "--config", str(twice)], capsys)
    assert f"{twice}: not valid YAML at line 5" in line and "the key 'data' is given twice (first at line 1)" in line


def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch):
    import distill.commands.fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.commands.fit, "make_cli", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / "distill.yaml")])
    assert exit_info.value.code == 130 and "interrupted (Ctrl+C)" in capsys.readouterr().err


def test_the_name_digits_beside_a_folder_called_digits_warns_which_one_is_used(tmp_path, monkeypatch):
    from distill.data.datamodule import ImageDataModule

    make_image_folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="'digits' is the bundled digits set, not the folder './digits'"):
        data = ImageDataModule("digits", img_size=32, num_workers=0)
    assert data.num_classes == 10 and len(ImageDataModule("./digits", img_size=32, num_workers=0).classes) == 3


def test_an_image_of_absurd_aspect_ratio_is_unreadable_not_a_memory_bomb(tmp_path):
    Image.fromarray(np.zeros((1, 5000, 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(UnreadableImage, match="5000x1 pixels: an aspect ratio over 100:1"):
        load_image(tmp_path / "strip.png")


def test_distill_alone_lists_every_command(capsys):
    cli_main([])
    text = capsys.readouterr().out
    assert all(name in text for name in ("fit", "pipeline", "compare", "export", "predict", "cache-teacher", "report"))


@pytest.mark.parametrize("args, message", [
    (["fitt", "--config", "configs/distill.yaml"], "'fitt' is not a command; did you mean 'fit'?"),
    (["exprot", "--ckpt", "best.ckpt"], "'exprot' is not a command; did you mean 'export'?"),
    (["predict", "--images", "photos"], "predict: give --export DIR --images FOLDER"),  # forgot --export
    (["predict"], "or --config FILE --ckpt_path CKPT for LightningCLI's predict"),
], ids=["typo-fit", "typo-export", "predict-without-export", "predict-alone"])
def test_a_mistyped_or_incomplete_command_is_one_line_naming_what_is_accepted(args, message, capsys):
    assert message in run_cli_error(args, capsys)


@pytest.mark.parametrize("export, message", [
    ({"from": "finetune_48", "int8": "false"}, "export.int8 must be true or false, got 'false'"),
    ({"from": "finetune_48", "onnx": False, "int8": True}, "export.int8 quantizes the ONNX model: set export.onnx"),
])
def test_a_pipeline_export_that_cannot_work_is_refused_before_any_stage_trains(tmp_path, export, message):
    spec = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    spec["export"] = export
    for stage in spec["stages"]:
        stage["config"] = str(ROOT / "configs" / stage["config"])
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message):
        load_spec(tmp_path / "pipeline.yaml")


def test_a_failed_pipeline_stage_is_one_error_line_and_its_exit_code(tmp_path, monkeypatch, capsys):
    import distill.commands.pipeline

    monkeypatch.setattr(distill.commands.pipeline, "_run_stage", lambda command: 2)  # the stage printed its own error line
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", "--config", str(ROOT / "configs" / "pipeline.yaml"), "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" not in err and "[pipeline] stage 'teacher' failed (exit 2, its error is above)" in err
