"""A run on a user's small folder (5 classes x 40 images, batch 64: 3 steps an epoch): every curve docs/telemetry.md
lists, no distillation loss without a teacher, and a summary as the run's last lines."""
import contextlib
import io
import logging
import shlex
from pathlib import Path

import pytest

from distill.cli import cli_main
from distill.training.step_logging import step_log_interval
from distill.training.summary import ValidationRecord, next_command, run_summary
from tests.helpers import TINY_TEACHER, make_image_folder, random_teacher_file, scalars, shrink

ROOT = Path(__file__).resolve().parents[1]

CLASSES = ("apple", "banana", "cherry", "diamond", "emerald")
# docs/telemetry.md's scalars of a run with a teacher, no EMA, no lr_scale_batch, no feature imitation
CURVES = ["train/loss", "train/loss_base", "train/loss_distill", "train/lr", "train/img_per_s", "train/epoch_time_s",
          "val/acc", "val/acc_cls", "val/acc_dist", "val/acc_top5", "val/acc_cls_top5", "val/acc_dist_top5",
          "val/teacher_acc", "val/teacher_agreement", "val/teacher_kl", "val/head_cosine", "val/token_cosine",
          "hp/best_acc", "hp/final_acc", "hp/final_acc_cls", "hp/final_acc_dist", "hp/final_teacher_agreement"]


def fit(folder: Path, config: str, data: Path, *extra: str) -> str:
    """`distill fit` as a user runs it (log_every_n_steps 10, the CLI's), two epochs; what it printed."""
    args = ["fit", *shrink(folder, config), f"--data.dataset={data}", "--data.batch_size=64", "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=1.0", "--trainer.log_every_n_steps=10",
            "--model.feature_weight=0", "--telemetry.attention_every_n_epochs=0", *extra]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli_main(args)
    return printed.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("small")
    data = make_image_folder(tmp / "images", CLASSES, per_class=40)
    teacher = random_teacher_file(tmp, TINY_TEACHER, len(CLASSES))
    return {
        "teacher": (tmp / "teacher", fit(tmp / "teacher", "teacher.yaml", data)),
        "distill": (tmp / "distill", fit(tmp / "distill", "distill.yaml", data,
                                         f"--model.teacher.init_args.model_name={TINY_TEACHER}",
                                         f"--model.teacher.init_args.weights={teacher}")),
    }


def test_every_curve_of_the_docs_is_logged_although_an_epoch_is_shorter_than_the_logging_interval(runs):
    logged = scalars(runs["distill"][0] / "runs")
    missing = [tag for tag in CURVES if tag not in logged]
    assert not missing
    assert len(logged["train/loss"]) == len(logged["train/lr"]) == 2 * 3  # every step of the two epochs


def test_a_run_without_a_teacher_logs_no_distillation_loss(runs):
    logged = scalars(runs["teacher"][0] / "runs")
    assert len(logged["train/loss"]) == 6 and "train/lr" in logged and "train/img_per_s" in logged
    assert not {"train/loss_base", "train/loss_distill"} & set(logged)  # the total's repeats, not terms


def summary(printed: str) -> list[str]:
    lines = printed.strip().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("fit done:")):]


def test_a_distillation_run_ends_with_its_figures_checkpoints_and_the_export_command(runs):
    folder, printed = runs["distill"]
    lines = summary(printed)
    assert lines[0].startswith("fit done: 2 epochs (6 steps), best at epoch ")
    rows = {line.split()[0]: line.split()[1:3] for line in lines[3:] if line.startswith("val/")}
    assert list(rows) == ["val/acc", "val/acc_cls", "val/acc_dist", "val/teacher_acc", "val/teacher_agreement"]
    final = scalars(folder / "runs")
    for name, (_, last) in rows.items():
        assert last == f"{100 * final[name][-1]:.2f}"  # the final epoch's figures, as TensorBoard shows them
    assert float(rows["val/acc"][0]) == pytest.approx(100 * max(final["val/acc"]), abs=0.005)
    checkpoints = next(line for line in lines if line.startswith("checkpoints: "))
    best = checkpoints.removeprefix("checkpoints: ").split(" (best)")[0]
    assert Path(best).resolve() == (folder / "ckpt" / "best.ckpt").resolve() and Path(best).is_file()
    assert lines[-1] == f"next: distill export --ckpt {shlex.quote(best)} --out exports/student"


def test_a_teacher_run_ends_with_the_command_that_distils_a_student_from_it(runs, tmp_path):
    folder, printed = runs["teacher"]
    lines = summary(printed)
    assert [line.split()[0] for line in lines if line.startswith("val/")] == ["val/acc"]  # one head, no teacher
    command = shlex.split(lines[-1].removeprefix("next: "))
    assert command[:4] == ["distill", "fit", "--config", "configs/distill.yaml"]
    options = dict(zip(command[4::2], command[5::2]))
    assert options["--model.teacher.init_args.model_name"] == TINY_TEACHER
    assert Path(options["--model.teacher.init_args.weights"]).resolve() == (folder / "ckpt" / "best.ckpt").resolve()
    assert options["--data.dataset"] == str(folder.parent / "images")


def test_a_teacher_runs_next_command_names_the_recipe_that_exists_from_where_it_is_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another folder: no configs/ here, the project's own recipe is named
    command = shlex.split(next_command("ckpt/best.ckpt", True, "resnet10t", None))
    assert Path(command[3]).is_file() and Path(command[3]).resolve() == ROOT / "configs" / "distill.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "distill.yaml").write_text("model: {}\n")  # the user's own copy, as the docs write it
    assert shlex.split(next_command("ckpt/best.ckpt", True, "resnet10t", None))[3] == "configs/distill.yaml"


def test_the_summary_shows_the_best_and_final_validation_per_head_in_percent():
    best = ValidationRecord(2, 30, {"val/acc": 0.9, "val/acc_cls": 0.85, "val/acc_dist": 0.875,
                                    "val/teacher_acc": 0.95, "val/teacher_agreement": 0.8})
    final = ValidationRecord(4, 50, {"val/acc": 0.8875, "val/acc_cls": 0.9, "val/acc_dist": 0.8,
                                     "val/teacher_acc": 0.95, "val/teacher_agreement": 0.8125})
    text = run_summary(best, final, 5, 50, True, {"best": "ckpt/best.ckpt", "last": "ckpt/last.ckpt"},
                       next_command("ckpt/best.ckpt", False, "deit_tiny", "flowers"))
    lines = text.splitlines()
    assert lines[0] == "fit done: 5 epochs (50 steps), best at epoch 3"
    assert [line.split()[:3] for line in lines[3:8]] == [
        ["val/acc", "90.00", "88.75"], ["val/acc_cls", "85.00", "90.00"], ["val/acc_dist", "87.50", "80.00"],
        ["val/teacher_acc", "95.00", "95.00"], ["val/teacher_agreement", "80.00", "81.25"]]
    assert lines[-2] == "checkpoints: ckpt/best.ckpt (best), ckpt/last.ckpt (final)"
    assert lines[-1] == "next: distill export --ckpt ckpt/best.ckpt --out exports/student"


def test_training_curves_are_logged_every_step_when_an_epoch_is_shorter_than_the_interval():
    assert step_log_interval(10, 3) == 1
    assert step_log_interval(10, 10) == 10 and step_log_interval(10, 250) == 10
    assert step_log_interval(0, 3) == 0  # never stays never
    assert step_log_interval(10, float("inf")) == 10  # a loader without a length


@pytest.mark.parametrize("acc, first_loss, last_loss, epoch, said", [
    (0.11, 2.30, 2.30, 12, True), (0.11, 2.30, 2.30, 5, False), (0.40, 2.30, 1.9, 30, False),
    (0.11, 2.30, 2.10, 12, False), (0.18, 2.18, 2.18, 12, True)],
    ids=["at_chance_after_warmup", "too_early_to_say", "learning", "near_chance_but_loss_falling",
         "stuck_at_the_class_shares"])
def test_a_run_still_at_chance_after_its_warmup_is_named_while_it_runs(caplog, acc, first_loss, last_loss, epoch,
                                                                       said):
    # near_chance_but_loss_falling: the letters' distilled runs a dozen epochs in, which then learn (docs/recipes.md);
    # stuck_at_the_class_shares: unbalanced classes, a student that predicts their shares (its loss under ln C)
    from types import SimpleNamespace

    import torch

    from distill.training.callbacks import StallAlarm

    def validate(alarm, module, at):
        for index in range(at):  # one validation an epoch, the loss going linearly from first to last
            loss = first_loss + (last_loss - first_loss) * index / max(at - 1, 1)
            trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=index,
                                      callback_metrics={"val/acc": torch.tensor(acc), "val/loss": torch.tensor(loss)})
            alarm.on_validation_end(trainer, module)
        alarm.on_validation_end(trainer, module)  # said once

    module = SimpleNamespace(hparams=SimpleNamespace(warmup_epochs=1.0, num_classes=10))
    with caplog.at_level(logging.INFO, logger="distill"):
        validate(StallAlarm(patience=10), module, epoch)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stalled")]
    assert len(lines) == (1 if said else 0)
    if said:
        # named at the first epoch it may be: warm-up 1 + patience 10
        assert f"val/acc {100 * acc:.1f}% after 11 epochs is at chance (10.0% for 10 classes)" in lines[0]
        assert "configs/baselines/no_teacher.yaml" in lines[0]  # no teacher: the augmentation is what to change
        caplog.clear()
        taught = SimpleNamespace(hparams=module.hparams, teacher=object())
        with caplog.at_level(logging.INFO, logger="distill"):
            validate(StallAlarm(patience=10), taught, epoch)
        advice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stalled")]
        assert len(advice) == 1 and "no_teacher.yaml" not in advice[0] and "model.lr" in advice[0]


def test_the_default_alarm_waits_for_a_student_that_leaves_chance_late_and_names_one_that_never_does(caplog):
    """The letters' baseline seed 0 (docs/recipes.md): 26 classes, warm-up 3, val/loss flat at ln 26 and top-1 at
    chance until epoch 19, then learning; the alarm says nothing of it, and names the same run had it stayed."""
    import math
    from types import SimpleNamespace

    import torch

    from distill.training.callbacks import StallAlarm

    def said(leaves_at: int | None) -> list[str]:
        caplog.clear()
        alarm, module = StallAlarm(), SimpleNamespace(hparams=SimpleNamespace(warmup_epochs=3.0, num_classes=26))
        for epoch in range(60):
            learning = leaves_at is not None and epoch >= leaves_at
            acc, loss = (0.2 + 0.01 * epoch, 2.5 - 0.02 * epoch) if learning else (0.04, math.log(26))
            trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=epoch,
                                      callback_metrics={"val/acc": torch.tensor(acc), "val/loss": torch.tensor(loss)})
            with caplog.at_level(logging.INFO, logger="distill"):
                alarm.on_validation_end(trainer, module)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("stalled")]

    assert said(leaves_at=19) == []
    (line,) = said(leaves_at=None)
    assert line.startswith("stalled: val/acc 4.0% after 28 epochs is at chance (3.8% for 26 classes)")


def test_a_resumed_fit_counts_its_wall_time_from_the_seconds_its_checkpoint_recorded():
    from types import SimpleNamespace

    from distill.training.summary import WALL_KEY, FitClock

    clock = FitClock()
    checkpoint: dict = {}
    clock.on_save_checkpoint(None, None, checkpoint)
    assert 0 <= checkpoint[WALL_KEY] < 60
    resumed = FitClock()
    resumed.on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn="fit")), None, {WALL_KEY: 100.0})
    assert 100.0 <= resumed.seconds() < 160
    resumed.on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn="validate")), None, {WALL_KEY: 5.0})
    assert resumed.seconds() >= 100.0  # the best checkpoint validated after the fit does not reset it
    older = FitClock()
    older.on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn="fit")), None, {})  # an earlier version's
    assert older.seconds() < 60  # checkpoint, without the key: counted from this process
