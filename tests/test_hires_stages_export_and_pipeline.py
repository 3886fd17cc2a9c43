"""Hi-res stages, export round-trips, prediction to CSV, and the resumable pipeline."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from distill.cli import cli_main
from distill.commands.pipeline import load_spec, stage_command
from distill.common.errors import UserError
from distill.commands.export import export_student, load_student
from distill.training.cli import make_cli
from students import Student
from students.resize import adapt_student_state
from tests.helpers import TINY_STUDENT, TINY_TEACHER, data_of, scalars, shrink, teacher_of

ROOT = Path(__file__).resolve().parents[1]


def test_resampling_keeps_both_prefix_tokens_and_interpolates_the_grid():
    small, large = Student(10, 32, **TINY_STUDENT), Student(10, 48, **TINY_STUDENT)
    state = small.state_dict()
    adapted = adapt_student_state(state, large)
    old, new = state["model.pos_embed"], adapted["model.pos_embed"]  # (1, 2 + 4*4, D) -> (1, 2 + 6*6, D)
    assert new.shape == large.state_dict()["model.pos_embed"].shape == (1, 2 + 36, 32)
    assert torch.equal(new[:, :2], old[:, :2])  # class and distillation tokens bit-identical
    grid = old[:, 2:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)  # (1, D, 4, 4); bicubic as timm (antialiased)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1)
    assert torch.allclose(new[:, 2:], expected.reshape(1, 36, -1), atol=1e-6)
    assert torch.equal(adapted["model.head.weight"], state["model.head.weight"])  # same classes: heads kept
    large.load_state_dict(adapted)


def test_a_new_class_count_reinitialises_the_heads_only():
    state = Student(10, 32, **TINY_STUDENT).state_dict()
    other = Student(3, 32, **TINY_STUDENT)
    with pytest.warns(UserWarning, match="heads re-initialised"):
        adapted = adapt_student_state(state, other)
    assert adapted["model.head.weight"].shape == (3, 32)
    assert torch.equal(adapted["model.blocks.0.attn.qkv.weight"], state["model.blocks.0.attn.qkv.weight"])


def test_a_stage_at_a_new_resolution_starts_close_to_where_the_previous_ended(trained):
    best = trained / "ckpt" / "best.ckpt"
    before = torch.load(best, map_location="cpu", weights_only=True)
    previous = next(v["best_model_score"] for k, v in before["callbacks"].items() if "Checkpoint" in k).item()
    args = [*shrink(trained / "hires", "distill.yaml"), *data_of(trained), "--data.img_size=40",
            f"--model.init_from={best}", "--trainer.limit_val_batches=1.0", *teacher_of(trained)]
    cli = make_cli(args, run=False)
    assert cli.model.student.model.pos_embed.shape[1] == 2 + 5 * 5
    first = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/acc"]
    assert previous > 0.8  # well above chance (1/3), so closeness means the weights were carried over
    assert abs(first - previous) < 0.15, (first, previous)


def test_init_from_a_file_that_is_not_a_student_checkpoint_is_one_line(trained, capsys, teacher_file):
    args = [*shrink(trained / "bad", "distill.yaml"), f"--model.init_from={teacher_file}",
            f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher_file}"]
    with pytest.raises(SystemExit):
        cli_main(["fit", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init_from: " in err[0] and "teacher.safetensors' is not a student checkpoint" in err[0]
    with pytest.raises(SystemExit):
        cli_main(["export", "--ckpt", str(teacher_file), "--out", str(trained / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export --ckpt: " in err[0] and "is not a student checkpoint" in err[0]
    assert not (trained / "nope").exists()


def test_export_round_trips_through_timm_onnx_and_torchscript(trained, tmp_path):
    out = tmp_path / "export"
    report = export_student(trained / "ckpt" / "best.ckpt", out)
    assert set(report["formats"]) == {"timm", "onnx", "torchscript"}
    assert all(r["max_abs_diff"] <= 1e-4 for r in report["formats"].values())
    assert json.loads((out / "export_report.json").read_text()) == report

    student, _ = load_student(trained / "ckpt" / "best.ckpt")
    images = torch.randn(3, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        expected = student(images)
        cls_logits, dist_logits = student.forward_heads(images)
        assert torch.allclose(expected, (cls_logits + dist_logits) / 2)  # the fused, averaged output
        via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images)
        via_script = torch.jit.load(str(out / "model.torchscript.pt"))(images)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    via_onnx = session.run(None, {"images": images.numpy()})[0]
    assert torch.allclose(via_timm, expected, atol=1e-5) and torch.allclose(via_script, expected, atol=1e-5)
    assert np.abs(via_onnx - expected.numpy()).max() < 1e-4

    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["cat", "dog", "fox"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["crop_pct"] == 1.0
    assert config["pretrained_cfg"]["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)


def test_export_refuses_to_overwrite_and_keeps_the_existing_folder(trained, tmp_path):
    out = tmp_path / "export"
    export_student(trained / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False)
    (out / "model.safetensors").write_bytes(b"previous export")
    with pytest.raises(UserError, match="already exists .*; pass --overwrite"):
        export_student(trained / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False)
    assert (out / "model.safetensors").read_bytes() == b"previous export"
    export_student(trained / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder or lock file left behind


def test_predict_writes_top_k_classes_with_names_and_probabilities(trained, tmp_path, capsys):
    export_student(trained / "ckpt" / "best.ckpt", tmp_path / "export", onnx=False, torchscript=False)
    cli_main(["predict", "--export", str(tmp_path / "export"), "--images", str(trained / "images" / "val"),
              "--out", str(tmp_path / "pred.csv"), "--top_k", "2"])
    assert "wrote 48 rows" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 48 and set(rows[0]) == {"path", "class_1", "prob_1", "class_2", "prob_2", "error"}
    assert not any(row["error"] for row in rows)
    for row in rows:
        assert float(row["prob_1"]) >= float(row["prob_2"]) and float(row["prob_1"]) + float(row["prob_2"]) <= 1 + 1e-6
    correct = sum(Path(row["path"]).parent.name == row["class_1"] for row in rows)
    assert correct / len(rows) > 0.8  # the colour-coded classes are learnt by the tiny student


def write_tiny_pipeline(tmp_path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    tiny = {f"model.student.init_args.{k}": v for k, v in TINY_STUDENT.items()}
    spec["stages"][0]["overrides"] = {"model.student.init_args.model_name": TINY_TEACHER, "trainer.max_epochs": 1}
    for stage in spec["stages"][1:]:
        stage["overrides"] = {**(stage.get("overrides") or {}), **tiny, "trainer.max_epochs": 4,
                              "model.teacher.init_args.model_name": TINY_TEACHER}
    spec["stages"][2]["overrides"]["trainer.max_epochs"] = 1
    spec["export"]["torchscript"] = False
    for stage in spec["stages"]:  # relative to the pipeline file, as in configs/pipeline.yaml
        stage["config"] = os.path.relpath(ROOT / "configs" / stage["config"], tmp_path)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


FAST = ["--data.num_workers=0", "--data.batch_size=16", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_the_pipeline_config_stages_parse_and_instantiate(tmp_path, teacher_file):
    spec = load_spec(ROOT / "configs" / "pipeline.yaml")
    for stage in spec["stages"]:
        command = stage_command(stage, tmp_path, [])
        args = [a for a in command[command.index("fit") + 1:] if not a.startswith(("--model.init_from", "--metrics"))]
        if stage.get("teacher_from"):
            args += [f"--model.teacher.init_args.model_name={TINY_TEACHER}",
                     f"--model.teacher.init_args.weights={teacher_file}"]
        cli = make_cli([*args, "--data.num_workers=0"], run=False)
        assert cli.model.hparams.img_size == (48 if stage["name"] == "finetune_48" else 32)


def test_a_pipeline_killed_in_a_stage_resumes_it_without_redoing_finished_stages(tmp_path):
    config = write_tiny_pipeline(tmp_path)
    command = [sys.executable, "-m", "distill", "pipeline", "--config", str(config), "--root", str(tmp_path), *FAST]
    run_dir = tmp_path / "digits"
    elsewhere = tmp_path / "elsewhere"  # not the repository: stage configs resolve relative to the pipeline file
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=elsewhere, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    last = run_dir / "distill" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-stage: epoch 0 of 4 is saved, the stage is not finished
    process.wait()
    assert last.exists() and not (run_dir / "distill" / "result.json").exists()
    teacher_result = (run_dir / "teacher" / "result.json").stat().st_mtime_ns

    rerun = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "teacher: finished earlier, skipped" in rerun.stdout
    assert f"distill: resuming from {last}" in rerun.stdout
    assert (run_dir / "teacher" / "result.json").stat().st_mtime_ns == teacher_result
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (3, 12)  # all 4 epochs of 3 steps, none repeated
    assert (run_dir / "export" / "model.onnx").is_file() and (run_dir / "finetune_48" / "result.json").is_file()
    table = rerun.stdout[rerun.stdout.index("stage "):]
    assert all(name in table for name in ("teacher", "distill", "finetune_48")) and "48" in table
    # one point per epoch on the curves: the best checkpoint's re-validation for result.json is not the last one
    teacher = json.loads((run_dir / "teacher" / "result.json").read_text())
    curve = scalars(run_dir / "teacher")["val/acc"]
    assert len(curve) == teacher["epochs"] and curve[-1] == pytest.approx(teacher["final_metrics"]["val/acc"])
