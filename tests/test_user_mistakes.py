"""The mistakes real users make, each either harmless or refused with one line; nothing earlier is lost.

Every refusal is asserted the same way: exit code 2, exactly one `error:` line naming the option or
file, and the files an earlier run wrote byte-identical afterwards.
"""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import cli_main
from distill.common.files import OutputLock, lock_path, replace_folder
from tests.helpers import ROOT, distill_args, make_image_folder, run_cli_error


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


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, capsys):
    line = run_cli_error([*distill_args(tmp_path), "--data.batch_size=2000"], capsys)
    assert "data.batch_size 2000 is larger than the 1436 training images each of the 1 process(es)" in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_a_run_that_took_no_optimiser_step_fails_and_writes_no_result(tmp_path, capsys):
    result = tmp_path / "result.json"
    line = run_cli_error([*distill_args(tmp_path), "--trainer.limit_train_batches=0", f"--metrics_json={result}"], capsys)
    assert "fit: the run took no optimiser step" in line and "nothing was trained" in line
    assert not result.exists()


def test_resuming_mid_epoch_with_another_batch_size_is_refused_naming_both(tmp_path, capsys):
    args = [*distill_args(tmp_path), "--trainer.limit_train_batches=4", "--trainer.max_steps=2"]  # stops mid-epoch
    cli_main(args)
    before = snapshot(tmp_path / "ckpt")
    line = run_cli_error([*args, "--ckpt_path=last", "--trainer.max_steps=4", "--data.batch_size=32"], capsys)
    assert "was saved by a run with other options (data.batch_size: 64 -> 32" in line  # a result of other options
    assert snapshot(tmp_path / "ckpt") == before
    cli_main([*args, "--ckpt_path=last", "--trainer.max_steps=4"])  # the same batch size resumes


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


@pytest.mark.parametrize("option, expected", [
    ("--trainer.max_epochs=two", "trainer.max_epochs: expected an integer, got 'two' (or null)"),
    ("--seed_everything=abc", "seed_everything: expected true or false or an integer, got 'abc'"),
    ("--data.mean=abc", "data.mean: expected a list of 3 numbers, got 'abc'"),
    ("--trainer.precision=wrong", "trainer.precision: expected one of 64, 32, 16, "),
    ("--model.student=foo.Bar", "model.student: 'foo.Bar' names no class (No module named 'foo')"),
    ("--model.student.init_args.dpth=3", "model.student: Student: Option 'dpth' is not accepted (its options: "),
    ("--trainer.logger.init_args.nme=x", "trainer.logger: TensorBoardLogger: Option 'nme' is not accepted (its "
                                         "options: save_dir, name"),
    ("--model.distillation=..X", "model.distillation: '..X' names no class ("),
    ("--model.distillation={class_path: DKD, init_args: {beta: -1}}",
     "model.distillation.init_args.beta: -1 is out of range (accepted: >= 0)"),
    ("--model.teacher=[{class_path: teachers.Teacher, init_args: {modelname: x}}]",
     "model.teacher: Teacher: Option 'modelname' is not accepted (its options: model_name, "),
    ("--model.distillation=DKD --model.distillation.standardize=maybe",
     "model.distillation.init_args.standardize: expected true or false, got 'maybe'"),
    ("--trainer.callbacks+=LearningRateMonitor --trainer.callbacks.logging_intervall=step",
     "trainer.callbacks: LearningRateMonitor: Option 'logging_intervall' is not accepted"),
    ("--model.lrr=1 --data.bs=2", "unknown options --model.lrr=1, --data.bs=2; did you mean 'model.lr'?"),
    ("--model.lrr+=1", "unknown option --model.lrr+=1; did you mean 'model.lr'?"),
    ("--data.scale=[0, 1]", "data.scale: 0 is out of range (accepted: > 0 and <= 1)"),
    ("--model.feature_pairs=[[1, -2]]", "model.feature_pairs: -2 is out of range (accepted: >= 0)"),
    ("--model.teacher={class_path: teachers.Teacher, init_args: {weights: 3}}",
     "model.teacher.init_args.weights: expected a string, got 3"),
    ("--trainer.logger.init_args.foo=1", "trainer.logger: TensorBoardLogger: Option 'foo' is not accepted (its "
                                         "options: save_dir, "),
    ("--model.distillation={class_path: Sofft}", "model.distillation: 'Sofft' names no class; give one of 'none'"),
    ("--model.distillation=", "model.distillation: '' is not one of 'none'"),
    ("--model.distillation=torch.nn.Linear", "model.distillation: 'torch.nn.Linear' is not a LogitMethod class"),
    ("--model__tau=3", "unknown option --model__tau=3; did you mean 'model.tau'?"),
    ("--model.tau.x=3", "unknown option 'model.tau.x' (model.tau takes a value, not options of its own)"),
    ("--trainer.logger+=pytorch_lightning.loggers.CSVLogger",
     "trainer.logger.init_args.save_dir: expected a string or a path, got null"),
], ids=["optional_int", "bool_or_int", "tuple", "choices_of_a_union", "class_path", "class_option", "library_class",
        "relative_class_path", "yaml_on_the_command_line", "yaml_list_of_classes", "a_class_options_bool",
        "an_option_of_a_lists_last_class", "two_unknown_options", "unknown_option_added_to", "an_item_of_a_tuple",
        "an_item_of_a_list_of_pairs", "a_string_option_of_a_class", "a_class_with_kwargs", "a_name_of_no_class",
        "an_empty_name", "a_class_of_another_kind", "underscores_for_dots", "an_option_below_a_number",
        "a_class_added_without_an_option_it_needs"])
def test_a_value_no_type_of_the_option_takes_is_one_line_naming_what_it_accepts(tmp_path, capsys, option, expected):
    # worded from the option, type and value jsonargparse's refusal carries (no message text of it is read)
    arguments = [option] if option.count("--") == 1 else option.split()
    line = run_cli_error([*distill_args(tmp_path), *arguments], capsys)
    assert line.startswith(f"error: {expected}"), line
    assert "Parser key" not in line and "Subtypes" not in line


@pytest.mark.parametrize("overlay, expected", [
    ("model: {student: {init_args: {depthh: 4}}}", "model.student: Student: Option 'depthh' is not accepted"),
    ("model: {student: {init_args: {depth: [1, 2]}}}",
     "model.student.init_args.depth: expected an integer > 0 or null, got [1, 2]"),
    ("model: {tau: {a: 1}}", 'model.tau: expected a number > 0, got {"a": 1}'),
    ("model:\n  teacher:\n  - class_path: teachers.Teacher\n    init_args: {model_name: resnet10t, weightz: a.ckpt}\n"
     "  - class_path: teachers.Teacher\n    init_args: {model_name: resnet10t}",
     "model.teacher: Teacher: Option 'weightz' is not accepted"),
    ("trainer: [1, 2]", "trainer: expected the Trainer's options as a mapping (trainer: {max_epochs: 10}), got [1, 2]"),
    ("model: {student: {class_path: students.Student, init_args: {depth: null, num_head: 4}}}",
     "model.student: Student: Option 'num_head' is not accepted"),
    ("model: {teacher: {class_path: teachers.Teacher, init_args: {model_name: resnet10t, weightz: 1}}}",
     "model.teacher: Teacher: Option 'weightz' is not accepted"),
], ids=["a_class_option_of_a_later_file", "a_list_for_a_number", "a_mapping_for_a_number", "an_ensemble_members_option",
        "a_list_for_the_trainer", "a_null_beside_an_unknown_option", "one_teacher_where_a_list_may_be"])
def test_a_mistake_in_a_later_config_file_is_named_against_the_class_the_earlier_one_chose(tmp_path, capsys, overlay,
                                                                                            expected):
    extra = tmp_path / "extra.yaml"
    extra.write_text(overlay + "\n")
    line = run_cli_error([*distill_args(tmp_path), "--config", str(extra)], capsys)
    assert line.startswith(f"error: {expected}"), line


def test_an_abbreviated_option_is_no_unknown_option(tmp_path, capsys):
    # argparse takes a unique start of an option's name: the stray value after it is what is refused
    line = run_cli_error([*distill_args(tmp_path), "--seed_every", "3", "stray"], capsys)
    assert "stray" in line and "seed_every" not in line, line


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


def test_an_image_over_the_decompression_bomb_limit_is_skipped_in_training_and_predict(tmp_path, monkeypatch,
                                                                                        earlier_run):
    from distill.training.datamodule import ImageDataModule
    from distill.commands.predict import predict_folder

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
        expected = "model.safetensors' changed since it was written (its sha256 is not the one in export_report.json)"
    else:
        out.write_text("yesterday's predictions")
        expected = "predictions.csv' exists; pass --overwrite"
    line = run_cli_error(["predict", "--export", str(export), "--images", str(images), "--out", str(out), *extra],
                         capsys)
    assert expected in line
    assert out.read_text() == "yesterday's predictions" if problem == "existing-out" else not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


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
    line = run_cli_error([*distill_args(tmp_path), f"--metrics_json={precious}"], capsys)
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


def test_an_error_of_a_clean_up_cut_short_by_a_second_ctrl_c_is_an_interruption_not_a_traceback(monkeypatch,
                                                                                                   capsys):
    import distill.cli

    def stopped_twice(argv):  # Lightning's teardown after a second KeyboardInterrupt, as fit.log showed it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Please call `iter(combined_loader)` first.")

    def broken(argv):  # a bug is not hidden
        raise RuntimeError("a real bug")

    monkeypatch.setattr(distill.cli, "command_of", lambda argv: ("report", stopped_twice))
    with pytest.raises(SystemExit) as stop:
        distill.cli.cli_main(["report", "x"])
    assert stop.value.code == 130
    assert "interrupted (Ctrl+C, twice: the clean-up stopped at 'Please call" in capsys.readouterr().err
    monkeypatch.setattr(distill.cli, "command_of", lambda argv: ("report", broken))
    with pytest.raises(RuntimeError, match="a real bug"):
        distill.cli.cli_main(["report", "x"])
