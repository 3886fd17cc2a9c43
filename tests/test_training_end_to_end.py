"""End-to-end fits through the CLI with the real configs shrunk by overrides."""
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.cli import cli_main
from distill.training.cli import make_cli
from tests.helpers import TINY_STUDENT, TINY_TEACHER, scalars, shrink

ROOT = Path(__file__).resolve().parents[1]


def test_distillation_fit_on_digits_keeps_the_teacher_frozen_and_out_of_the_checkpoint(tmp_path, teacher_file):
    args = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}"]
    cli = make_cli(args, run=False)
    teacher = cli.model.teacher
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student_before = {k: v.clone() for k, v in cli.model.student.state_dict().items()}
    cli.trainer.fit(cli.model, cli.datamodule)

    after = teacher.model.state_dict()  # in the fast path's dtype (bf16 on CPUs that run it natively)
    assert any("running_mean" in k for k in after)  # BatchNorm buffers are among what is compared
    assert all(torch.equal(before[k].to(after[k].dtype), after[k]) for k in before)
    assert all(torch.equal(after[k], v.to(after[k].dtype)) for k, v in load_file(str(teacher_file)).items())
    assert any(not torch.equal(student_before[k], v) for k, v in cli.model.student.state_dict().items())

    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}

    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(tmp_path / "ckpt" / name, map_location="cpu", weights_only=True)
        # the student and the recipe's feature-imitation projections (trained with it); never the teacher
        assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"student", "imitation"}, name
        assert ckpt["teacher_config"]["weights"] == str(teacher_file)
        assert ckpt["student_config"]["embed_dim"] == TINY_STUDENT["embed_dim"]
        assert ckpt["hyper_parameters"]["class_names"] == [str(d) for d in range(10)]

    logged = scalars(tmp_path / "runs")
    for tag in ("train/loss", "train/loss_base", "train/loss_distill", "train/lr", "val/acc", "val/acc_cls",
                "val/acc_dist", "val/acc_top5", "val/teacher_acc", "val/teacher_agreement"):
        assert tag in logged and all(torch.isfinite(torch.tensor(logged[tag]))), tag
    assert 0.0 <= logged["val/teacher_agreement"][-1] <= 1.0


def test_validate_from_a_checkpoint_rebuilds_the_teacher_from_the_config(tmp_path, teacher_file, capsys):
    args = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher_file}"]
    cli_main(["fit", *args])
    best = tmp_path / "ckpt" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=True)
    cli = make_cli(["validate", *args, f"--ckpt_path={best}"])
    metrics = cli.trainer.callback_metrics
    best_score = next(v["best_model_score"] for k, v in saved["callbacks"].items() if "Checkpoint" in k)
    assert metrics["val/acc"].item() == best_score.item()
    assert "val/teacher_acc" in metrics


def test_supervised_fit_on_a_generated_image_folder_links_its_classes(tmp_path, image_folder):
    cli = make_cli(["fit", *shrink(tmp_path, "teacher.yaml"), f"--data.dataset={image_folder}", "--data.batch_size=6"])
    assert cli.model.hparams.num_classes == 3
    assert cli.model.hparams.class_names == ["cat", "dog", "fox"]
    assert cli.model.student.model.get_classifier().out_features == 3
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == ["cat", "dog", "fox"]
    assert "val/acc" in cli.trainer.callback_metrics and "val/teacher_acc" not in cli.trainer.callback_metrics


def test_a_teacher_trained_by_this_project_loads_from_its_checkpoint(tmp_path):
    from teachers import Teacher
    cli = make_cli(["fit", *shrink(tmp_path, "teacher.yaml")])
    teacher = Teacher(TINY_TEACHER, weights=str(tmp_path / "ckpt" / "best.ckpt"), precision="32", channels_last=False)
    images = torch.randn(2, 3, 32, 32)
    student = cli.model.student.eval()
    assert teacher.mean == tuple(cli.datamodule.mean)
    assert torch.equal(teacher(images), student(images))


def test_last_checkpoint_is_the_latest_epoch_even_when_accuracy_stops_improving(tmp_path):
    # lr 0: the accuracy of epoch 1 equals epoch 0's, so only epoch 0 is "best"
    args = [*shrink(tmp_path, "teacher.yaml"), "--trainer.max_epochs=2", "--model.lr=0", "--model.warmup_lr=0",
            "--model.min_lr=0"]
    make_cli(["fit", *args])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", map_location="cpu", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 1)


def test_a_fits_console_has_the_student_and_teacher_lines_and_no_lightning_banners_or_tips(tmp_path, teacher_file,
                                                                                          capsys, caplog):
    caplog.set_level(logging.INFO)  # every record Lightning and the project create reaches caplog
    shrunk = [arg for arg in shrink(tmp_path, "distill.yaml") if "enable_model_summary" not in arg]  # the default
    cli_main(["fit", *shrunk, f"--model.teacher.init_args.model_name={TINY_TEACHER}",
              f"--model.teacher.init_args.weights={teacher_file}"])
    console = "\n".join([*caplog.messages, *capsys.readouterr()])
    assert "Student: deit_tiny (" in console and f"Teacher: {TINY_TEACHER} (" in console
    for banner in ("GPU available", "TPU available", "Tip:", "litlogger", "Total params", "Seed set to"):
        assert banner not in console, banner
