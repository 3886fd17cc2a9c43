"""Reliability: runs that are killed or preempted resume exactly; bad input is one clear line."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cli import cli_main
from tests.helpers import (
    TINY_TEACHER,
    distill_args,
    make_image_folder,
    nothing_written,
    random_teacher_file,
    run_cli_error,
    shrink,
)

ROOT = Path(__file__).resolve().parents[1]


def fit_command(tmp_path: Path, teacher_file: Path, *extra: str) -> list[str]:
    """A 3-epoch tiny distillation on digits (4 steps an epoch, one data worker, dropout on)."""
    return [sys.executable, "-m", "distill", "fit", *shrink(tmp_path, "distill.yaml"), "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=4", "--data.num_workers=1", "--model.student.init_args.drop_path_rate=0.1",
            "--data.mixup=0.2", f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}", *extra]


def _default_sigint() -> None:
    # a shell's background job starts with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # the child gets Ctrl+C's default behaviour whatever started pytest
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(command: list[str]) -> subprocess.CompletedProcess:
    """The run in a process of its own (to be killed), with this process's thread count: the weights it
    trains are compared bit for bit with ones trained here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=_default_sigint)


def run_here(command: list[str]) -> None:
    """A run that is not interrupted, in this process (no second start-up of torch and Lightning)."""
    assert command[:3] == [sys.executable, "-m", "distill"]
    cli_main(command[3:])


def final_student(folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 12)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("student.")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    teacher = _teacher_file(tmp)
    run_here(fit_command(tmp, teacher))
    return teacher, final_student(tmp)


def _teacher_file(folder: Path) -> Path:
    return random_teacher_file(folder, name="teacher.safetensors")


# SIGTERM's mid-epoch save is checked by test_ddp_multi_process.py (rank 0 saves at the batch it stops, the run
# resumes) and by the accumulation-window test below; an exact resume from a mid-epoch checkpoint by the second case
@pytest.mark.parametrize("signal_name, extra, saved_at", [
    ("SIGKILL", [], 4),  # the end of epoch 0: nothing after it was saved
    ("SIGKILL", ["--trainer.val_check_interval=0.5"], 6),  # the last save was a mid-epoch validation's
], ids=["sigkill", "sigkill-after-mid-epoch-validation"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_as_an_uninterrupted_run(
        tmp_path, uninterrupted, signal_name, extra, saved_at):
    teacher, expected = uninterrupted
    killer = ["--trainer.callbacks+=tests.signals.SignalAtStep", "--trainer.callbacks.step=7",
              f"--trainer.callbacks.signal_name={signal_name}"] if extra else [
              "--trainer.callbacks+=tests.signals.SignalAtStep", "--trainer.callbacks.step=6",
              f"--trainer.callbacks.signal_name={signal_name}"]
    killed = run(fit_command(tmp_path, teacher, *extra, *killer))  # step 6/7 = batch 2/3 of epoch 1
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert killed.returncode == -9
    assert last["global_step"] == saved_at
    assert not list((tmp_path / "ckpt").glob("*.partial"))

    run_here(fit_command(tmp_path, teacher, *extra, "--ckpt_path=last"))
    weights = final_student(tmp_path)
    assert weights.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, different[:5]


def test_sigterm_inside_a_gradient_accumulation_window_keeps_the_previous_checkpoint_and_resumes_exactly(
        tmp_path, uninterrupted):
    teacher, _ = uninterrupted
    accumulate = ["--trainer.accumulate_grad_batches=2"]
    run_here(fit_command(tmp_path / "reference", teacher, *accumulate))
    expected = torch.load(tmp_path / "reference" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    # epoch 1, batch 0: the first half of a window (its gradient is not in any checkpoint)
    killer = ["--trainer.callbacks+=tests.signals.SignalAtStep", "--trainer.callbacks.step=2",
              "--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.batch=0"]
    stopped = run(fit_command(tmp_path, teacher, *accumulate, *killer))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "inside a gradient-accumulation window" in stopped.stderr
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    run_here(fit_command(tmp_path, teacher, *accumulate, "--ckpt_path=last"))
    weights = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert weights["global_step"] == expected["global_step"] == 6
    different = [k for k, v in expected["state_dict"].items() if k.startswith("student.")
                 and not torch.equal(weights["state_dict"][k], v)]
    assert not different, different[:5]


def test_a_run_stopped_by_ctrl_c_or_sigterm_never_leaves_a_half_written_checkpoint(tmp_path, uninterrupted):
    # the checkpoint is written beside its target and renamed: no *.partial is left, last.ckpt loads
    teacher, _ = uninterrupted
    killer = ["--trainer.callbacks+=tests.signals.SignalAtStep", "--trainer.callbacks.step=5",
              "--trainer.callbacks.signal_name=SIGINT"]
    stopped = run(fit_command(tmp_path, teacher, *killer))
    assert stopped.returncode == 130, stopped.stderr[-3000:]  # 128 + SIGINT, as a shell reports Ctrl+C
    assert "interrupted (Ctrl+C)" in stopped.stderr
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    assert not list((tmp_path / "ckpt").glob("*.partial"))


@pytest.mark.parametrize("step, kept", [(8, 4), (12, 8)], ids=["second_epoch", "final_epoch"])
def test_ctrl_c_after_an_epochs_last_step_keeps_the_save_before_it_and_the_resume_validates_every_epoch(
        tmp_path, uninterrupted, step, kept):
    """Ctrl+C between an epoch's last step and its validation (the hostile user's `timeout -s INT`): the save before
    that epoch is kept, so the resume trains the epoch again and validates it (after the final epoch: its final
    figures, which compare reads), ending on the weights of a run never stopped."""
    import json

    teacher, expected = uninterrupted
    killer = ["--trainer.callbacks+=tests.signals.SignalAtStep", f"--trainer.callbacks.step={step}",
              "--trainer.callbacks.signal_name=SIGINT"]
    stopped = run(fit_command(tmp_path, teacher, *killer))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "before the epoch's end (its validation, its save)" in stopped.stderr
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == kept and saved["fit_wall_time_s"] > 0
    run_here(fit_command(tmp_path, teacher, "--ckpt_path=last", f"--metrics_json={tmp_path / 'metrics.json'}"))
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["steps"] == 12 and "val/acc" in result["final_metrics"], result
    assert result["wall_time_s"] > saved["fit_wall_time_s"]  # the whole run's time, not the resumed process's
    history = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["validation_history"]
    assert [record["epoch"] for record in history] == [0, 1, 2]  # no epoch's validation skipped
    weights = final_student(tmp_path)
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, different[:5]


def test_a_save_after_the_last_step_from_an_earlier_version_still_gives_the_run_its_final_figures(
        tmp_path, uninterrupted, monkeypatch):
    """A last.ckpt saved after the final step and before its validation (as versions before the rule above
    saved on Ctrl+C): the resumed fit trains nothing more, so it validates the final weights for its result."""
    import json

    from distill.training.callbacks import BestAndLastCheckpoint

    teacher, _ = uninterrupted
    monkeypatch.setattr(BestAndLastCheckpoint, "_epoch_trained_not_closed", staticmethod(lambda trainer: False))
    killer = ["--trainer.callbacks+=tests.signals.SignalAtStep", "--trainer.callbacks.step=12",
              "--trainer.callbacks.signal_name=SIGINT"]
    # in this process: Ctrl+C raises KeyboardInterrupt here too when pytest runs as a shell's background job
    # (which starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):
            run_here(fit_command(tmp_path, teacher, *killer))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 12
    run_here(fit_command(tmp_path, teacher, "--ckpt_path=last", f"--metrics_json={tmp_path / 'metrics.json'}"))
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/acc", "val/acc_cls", "val/acc_dist"} <= result["final_metrics"].keys(), result


# ---------------------------------------------------------------------------------------------
# Bad input: one line `error: ...` naming the option or file, exit 2, nothing written.


def test_missing_dataset_folder(tmp_path, capsys):
    line = run_cli_error([*distill_args(tmp_path), f"--data.dataset={tmp_path / 'nope'}"], capsys)
    assert "data.dataset: folder" in line and "nope' does not exist" in line and "train/ and val/" in line
    assert nothing_written(tmp_path)


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    line = run_cli_error([*distill_args(tmp_path), f"--data.dataset={tmp_path / 'empty'}"], capsys)
    assert "empty/train' holds no class folders" in line
    assert nothing_written(tmp_path)


def test_a_class_folder_with_no_images(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    for image in (root / "train" / "dog").iterdir():
        image.unlink()
    line = run_cli_error([*distill_args(tmp_path, 3), f"--data.dataset={root}", "--data.batch_size=4"], capsys)
    assert "class folder" in line and "train/dog' holds no images" in line and ".png" in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def broken_images(root: Path) -> list[Path]:
    truncated = root / "train" / "cat" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    not_an_image = root / "train" / "dog" / "notes.png"
    not_an_image.write_text("this is not a picture")
    return [truncated, not_an_image]


def test_unreadable_images_are_skipped_with_a_warning_naming_each(tmp_path):
    from distill.training.datamodule import ImageDataModule

    root = make_image_folder(tmp_path / "images")
    bad = broken_images(root)
    data = ImageDataModule(str(root), img_size=32, batch_size=4, num_workers=0, mixup=0, cutmix=0)
    data.setup("fit")
    with pytest.warns(UserWarning) as caught:
        batches = list(data.train_dataloader())
    messages = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
    assert sorted(m.split("'")[1] for m in messages) == sorted(str(p) for p in bad)
    assert "2 skipped so far" in messages[-1]
    assert sum(len(b.targets) for b in batches) == 16  # 19 files, 2 unreadable: every batch still full (drop_last)


def test_unreadable_image_with_bad_images_error_stops_naming_the_file(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    broken_images(root)
    # one data worker: the error crosses a process boundary and still comes out as one line
    line = run_cli_error([*distill_args(tmp_path, 3), f"--data.dataset={root}", "--data.batch_size=4",
                          "--data.num_workers=1", "--data.bad_images=error", "--trainer.limit_train_batches=1.0"], capsys)
    assert "data: cannot read image '" in line and ("0.png" in line or "notes.png" in line)
    assert "data.bad_images=skip" in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_teacher_with_the_wrong_number_of_classes(tmp_path, capsys):
    line = run_cli_error(distill_args(tmp_path, teacher_classes=5), capsys)
    assert "predicts 5 classes but the dataset has 10" in line
    assert nothing_written(tmp_path)


def test_teacher_weights_of_another_architecture_name_the_first_mismatched_keys(tmp_path, capsys):
    other = random_teacher_file(tmp_path, "resnet10t", 10)
    line = run_cli_error([*distill_args(tmp_path), f"--model.teacher.init_args.weights={other}"], capsys)
    assert f"'{other}' does not fit '{TINY_TEACHER}'" in line and " (e.g. '" in line
    assert nothing_written(tmp_path)


def test_teacher_file_that_is_not_weights(tmp_path, capsys):
    bogus = tmp_path / "teacher.ckpt"
    bogus.write_text("hello")
    line = run_cli_error([*distill_args(tmp_path), f"--model.teacher.init_args.weights={bogus}"], capsys)
    assert "teacher.ckpt' is not a weights file" in line and ".safetensors" in line


def test_image_size_the_patch_size_does_not_divide(tmp_path, capsys):
    line = run_cli_error([*distill_args(tmp_path), "--data.img_size=36"], capsys)
    assert "image size 36 is not divisible by patch size 8" in line


def test_unknown_timm_model_suggests_close_names(tmp_path, capsys):
    line = run_cli_error([*distill_args(tmp_path), "--model.student.init_args.model_name=deit_tinny"], capsys)
    assert "unknown timm model 'deit_tinny'" in line and "deit_tiny" in line


@pytest.mark.parametrize("where", ["yaml", "yaml, print_config", "yaml, a dotted key", "command line",
                                   "command line, its value apart"])
def test_an_option_that_does_not_exist_is_named_with_a_close_match(tmp_path, capsys, where):
    # jsonargparse refuses these in two places (the root parser's check of the config, the subcommand's of argv);
    # a class's own options (--trainer.logger.init_args.name) are no unknown options
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  lrr: 0.1\n")
    if "dotted" in where:
        extra.write_text("model.lrr: 0.1\n")
    args = {"yaml": ["--config", str(extra)], "yaml, print_config": ["--config", str(extra), "--print_config"],
            "yaml, a dotted key": ["--config", str(extra)],
            "command line": ["--model.lrr=0.1"], "command line, its value apart": ["--model.lrr", "0.1"]}[where]
    line = run_cli_error([*distill_args(tmp_path), "--trainer.logger.init_args.name=x", *args], capsys)
    shown = ("'model.lrr'" if where.startswith("yaml") else "--model.lrr 0.1" if "apart" in where
             else "--model.lrr=0.1")
    assert f"unknown option {shown}; did you mean 'model.lr'?" in line, line
    assert (str(extra) in line) == where.startswith("yaml")
    assert nothing_written(tmp_path)


def test_an_output_folder_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder is needed (works as root too, unlike chmod)")
    line = run_cli_error([*distill_args(tmp_path), f"--checkpoint.dirpath={blocker / 'ckpt'}"], capsys)
    assert f"checkpoint.dirpath: cannot write to '{blocker / 'ckpt'}'" in line
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_non_finite_loss_stops_with_the_step_and_the_loss_parts(tmp_path, capsys):
    line = run_cli_error([*distill_args(tmp_path), "--model.lr=1e30", "--model.warmup_epochs=0",
                          "--model.warmup_lr=1e30"], capsys)
    assert "non-finite loss at epoch 0, step 1" in line and "loss_base=nan" in line and "loss_distill=" in line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # no diverged weights saved


def test_resuming_with_a_checkpoint_of_another_student_is_refused(tmp_path, capsys):
    cli_main(distill_args(tmp_path))
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    line = run_cli_error([*distill_args(tmp_path), "--model.student.init_args.depth=3", f"--ckpt_path={last}"], capsys)
    assert "was saved by a run with other options (model.student.init_args.depth: 2 -> 3" in line
    assert last.read_bytes() == before


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("use", ["ckpt_path", "init_from", "teacher", "export"])
def test_a_crafted_pickle_is_refused_without_running_its_code(tmp_path, capsys, use):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "student_config": {}, "payload": RunsCode(marker)}, crafted)
    if use == "export":
        line = run_cli_error(["export", "--ckpt", str(crafted), "--out", str(tmp_path / "export")], capsys)
        assert not (tmp_path / "export").exists()
    else:
        option = {"ckpt_path": f"--ckpt_path={crafted}", "init_from": f"--model.init_from={crafted}",
                  "teacher": f"--model.teacher.init_args.weights={crafted}"}[use]
        line = run_cli_error([*distill_args(tmp_path), option], capsys)
        assert nothing_written(tmp_path)
    assert "crafted.ckpt" in line and ("not a student checkpoint" in line or "not a weights file" in line)
    assert not marker.exists()


def test_a_killed_export_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    from distill.commands import export

    cli_main(distill_args(tmp_path))
    out = tmp_path / "export"
    export.export_student(tmp_path / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died while writing TorchScript

    monkeypatch.setattr(export, "_run_torchscript", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export_student(tmp_path / "ckpt" / "best.ckpt", out, onnx=False, torchscript=True, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_sigterm_to_the_pipeline_reaches_the_running_stage(tmp_path):
    import signal
    import threading

    from distill.commands.pipeline import _run_stage

    stage = [sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\ntime.sleep(60)"]
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the pipeline is preempted
    assert _run_stage(stage) == 143  # the stage saw it (and, being `distill fit`, saved last.ckpt)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("stop", ["sigterm", "error", "ctrl_c", "ctrl_c_here_alone"])
def test_a_command_stopped_stops_the_processes_it_started_and_waits_for_them(tmp_path, monkeypatch, stop):
    # compare's runs and the pipeline's stages: a SIGTERM (or a failure) of the command reaches each running child
    # as SIGTERM, which `distill fit` answers by saving last.ckpt; a Ctrl+C from the terminal reaches them too, so
    # they are given time to stop by themselves, then (an interrupt of this process alone) SIGTERM
    import signal
    import threading

    from distill.common.processes import Children, stop_on_sigterm

    monkeypatch.setattr(Children, "GRACE_S", 3.0)
    quick = stop == "ctrl_c"  # the children got the Ctrl+C too and stop within the grace
    child = [sys.executable, "-c", "import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(r'{tmp_path}', 'got_sigterm').touch(), sys.exit(143)))\n"
             "time.sleep(1 if sys.argv[1] == 'quick' else 60)", "quick" if quick else "slow"]
    before = signal.getsignal(signal.SIGTERM)
    expected = {"sigterm": SystemExit, "error": RuntimeError}.get(stop, KeyboardInterrupt)
    began = time.monotonic()
    with pytest.raises(expected) as caught:
        with stop_on_sigterm() as children:
            processes = [children.start(child), children.start(child)]
            time.sleep(0.5)  # the children's handlers are installed
            if stop == "sigterm":
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
                processes[0].wait()
            raise expected() if stop != "sigterm" else AssertionError("SIGTERM did not stop the block")
    assert all(p.returncode is not None for p in processes)  # none left running
    assert (tmp_path / "got_sigterm").exists() == (not quick)
    assert [p.returncode for p in processes] == ([0, 0] if quick else [143, 143])
    assert time.monotonic() - began < (6 if stop == "ctrl_c_here_alone" else 3)  # the grace, not their 60 s
    if stop == "sigterm":
        assert caught.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before
