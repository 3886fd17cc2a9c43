"""DDP across two real processes on CPU (gloo): what a multi-GPU or multi-node run relies on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from distill.training.cli import make_cli
from tests.helpers import TINY_TEACHER, shrink

ROOT = Path(__file__).resolve().parents[1]


def test_a_two_process_ddp_fit_logs_the_accuracy_its_best_checkpoint_has_in_one_process(tmp_path, teacher_file):
    common = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
              f"--model.teacher.init_args.weights={teacher_file}", "--trainer.limit_val_batches=1.0"]
    ddp = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=2",
           "--trainer.limit_train_batches=4", "--model.ema_decay=0.9", "--data.repeated_aug=3",
           "--trainer.callbacks+=tests.ddp_checks.RecordRank", f"--trainer.callbacks.out={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # two 1-thread processes on 2 cores
    run = subprocess.run([sys.executable, "-m", "distill", "fit", *common, *ddp], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["ddp"] and not r["teacher_in_ddp"] for r in ranks)
    # repeated augmentation (3): each rank gets half an epoch of (epoch, index, repeat) keys, none shared,
    # and the copies of an image go to both ranks, each with its own augmented view
    shares = [{tuple(key) for key in r["keys"]} for r in ranks]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 1437 // 2 and not shares[0] & shares[1]
    indices = [{key[1] for key in share} for share in shares]
    assert len(indices[0] & indices[1]) > 200
    # written once: one TensorBoard run, one best and one last checkpoint
    assert len(list((tmp_path / "runs").rglob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.ckpt", "last.ckpt"]

    best = tmp_path / "ckpt" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=True)
    logged = next(v["best_model_score"] for k, v in saved["callbacks"].items() if "Checkpoint" in k).item()
    single = make_cli(["validate", *common, f"--ckpt_path={best}", "--trainer.logger=false"])
    assert single.trainer.world_size == 1
    assert single.trainer.callback_metrics["val/acc"].item() == logged  # synchronised over all 360 images
    assert "val_ema/acc" in single.trainer.callback_metrics


def test_sigterm_to_rank_zero_of_a_ddp_run_saves_and_exits_and_the_run_resumes(tmp_path, teacher_file):
    # what a scheduler or `distill pipeline` does: one process gets SIGTERM, Lightning tells the others
    common = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
              f"--model.teacher.init_args.weights={teacher_file}", "--trainer.strategy=ddp",
              "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=2",
              "--trainer.limit_train_batches=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killer = ["--trainer.callbacks+=tests.signals.SignalAtStep", "--trainer.callbacks.step=2",
              "--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.rank=0"]
    stopped = subprocess.run([sys.executable, "-m", "distill", "fit", *common, *killer], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)  # a hang would time out here
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] in (2, 3)  # rank 0 stopped after its step 2, or one step later
    assert not list((tmp_path / "ckpt").glob("*.partial"))
    resumed = subprocess.run([sys.executable, "-m", "distill", "fit", *common, "--ckpt_path=last"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8
