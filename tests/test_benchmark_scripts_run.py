"""The benchmark scripts run (their figures are measured by hand, see docs/speed.md: not timed here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_train_speed_prints_one_row_per_setting_with_the_ratio_to_the_plain_loop():
    rows = "plain,fit_cache"  # the plain loop and fit from the cache; gpu_check runs timm's task and the live teacher
    run = subprocess.run(
        [sys.executable, "benchmarks/train_speed.py", "--student=deit_tiny", "--teacher=test_resnet", "--img-size=32",
         "--batch=4", "--classes=10", "--steps=2", "--warmup=1", f"--rows={rows}", "--threads=1"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows.split(","))  # header + one line per row: none failed
    assert table[1].split("|")[3].strip() == "1.00"  # the plain loop is the reference
    assert "this project's fit, teacher cache" in run.stdout


def test_gpu_check_smoke_run_gives_every_row_its_throughput_teacher_share_and_mfu(tmp_path):
    rows = "plain_bf16,timm_task_bf16,fit_bf16"  # the live-teacher paths: hand-written loop, timm's task, fit
    out = tmp_path / "gpu_check.md"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--students=deit_tiny", f"--rows={rows}",
         "--peak-tflops=1", f"--out={out}"],
        cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| DeiT-Ti")]
    assert [line.split("|")[2].strip() for line in table] == [
        "plain PyTorch loop, bf16 autocast (reference DeiT, AMP)", "timm.task.TokenDistillationTask, bf16 autocast",
        "fit as the DeiT-tiny config: bf16-mixed student, default teacher"]
    cells = [[cell.strip() for cell in line.split("|")[4:10]] for line in table]
    assert cells[0][1] == "1.00"  # the bf16 plain loop is the reference
    for img_s, _, share, step_ms, peak_gib, mfu in cells:
        assert float(img_s) > 0 and float(step_ms) > 0 and float(peak_gib) > 0
        assert 0 < float(share.rstrip("%")) < 100 and 0 < float(mfu.rstrip("%"))  # the teacher ran; FLOPs counted
    assert "DeiT-Ti 5.5M params" in run.stdout  # the student's size and FLOPs in the header
    assert [line for line in out.read_text().splitlines() if line.startswith("| DeiT-Ti")] == table  # kept


def test_loader_speed_compares_both_loaders_with_and_without_mixing_on_jpegs_it_makes(tmp_path):
    run = subprocess.run(
        [sys.executable, "benchmarks/loader_speed.py", f"--data={tmp_path / 'jpegs'}", "--images=16", "--classes=2",
         "--img-size=32", "--batch=4", "--workers=0", "--repeats=2"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in run.stdout.splitlines() if line.startswith("| ") and "img/s" not in line}
    assert len(rows) == 4 and len(list((tmp_path / "jpegs" / "train").rglob("*.jpg"))) == 16
    assert float(rows["this project + per-pair mixing (exact replay)"][2]) > 0  # the ratio to the reference
    assert float(rows["reference + timm Mixup on the batch"][3]) > 0  # time spent mixing


def test_fit_probe_trains_without_augmentation_and_prints_both_losses(tmp_path):
    from tests.helpers import make_image_folder

    data = make_image_folder(tmp_path / "images", per_class=4)
    run = subprocess.run(
        [sys.executable, "benchmarks/fit_probe.py", f"--data={data}", "--model=deit_tiny_distilled_patch16_224",
         '--model-args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}', "--epochs=2",
         "--conv-stem"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "12 training and 12 validation images, 3 classes (chance 33.33%" in run.stdout and "+ conv stem" in run.stdout
    assert "epoch    2  training loss" in run.stdout and "validation top-1" in run.stdout


@pytest.mark.parametrize("script, classes", [("make_letters.py", 26), ("make_shapes.py", 24)])
def test_each_dataset_generator_writes_an_image_folder_the_data_module_reads_and_never_overwrites(tmp_path, script,
                                                                                                   classes):
    from distill.training.datamodule import ImageDataModule

    out = tmp_path / "data"
    command = [sys.executable, f"benchmarks/{script}", f"--out={out}", "--train=2", "--val=1"]
    run = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    data = ImageDataModule(str(out), img_size=32, num_workers=0, auto_augment=None, mixup=0.0, cutmix=0.0)
    data.setup("fit")
    assert data.num_classes == classes and len(data.train_set) == 2 * classes and len(data.val_set) == classes
    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    held_out = tmp_path / "held_out"  # --train 0: val/ alone, which validate and test read and fit refuses
    command = [sys.executable, f"benchmarks/{script}", f"--out={held_out}", "--train=0", "--val=1", "--seed=1"]
    run = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and sorted(p.name for p in held_out.iterdir()) == ["val"], run.stderr[-3000:]
    data = ImageDataModule(str(held_out), img_size=32, num_workers=0, auto_augment=None, mixup=0.0, cutmix=0.0)
    data.setup("validate")
    assert data.num_classes == classes and len(data.val_set) == classes


def test_teacher_share_prints_the_teachers_share_of_a_step_and_what_a_cache_of_it_would_hold(tmp_path):
    from tests.helpers import TINY_STUDENT, TINY_TEACHER, random_teacher_file

    teacher = random_teacher_file(tmp_path, TINY_TEACHER, 10)
    run = subprocess.run(
        [sys.executable, "benchmarks/teacher_share.py", "--steps=1", "--config", "configs/distill.yaml",
         f"--model.teacher.init_args.model_name={TINY_TEACHER}", f"--model.teacher.init_args.weights={teacher}",
         *[f"--model.student.init_args.{k}={v}" for k, v in TINY_STUDENT.items()], "--data.batch_size=8"],
        cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 teacher member(s), feature imitation on" in run.stdout  # the recipe's imitation, on a tiny pair
    assert "% of a live step: a cache of its outputs makes a step at most" in run.stdout
    assert "KiB of feature maps (fp16, every member's)" in run.stdout


def test_student_speed_prints_each_student_against_its_teacher():
    run = subprocess.run(
        [sys.executable, "benchmarks/student_speed.py", "--sizes=2x64,1x32", "--teacher=test_resnet", "--classes=5",
         "--repeats=1"], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
        check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in run.stdout.splitlines() if line.startswith("| ") and "params" not in line}
    assert list(rows) == ["student depth 2, width 64", "student depth 1, width 32", "teacher test_resnet"]
    assert rows["teacher test_resnet"][3] == rows["teacher test_resnet"][5] == "1.00"  # the reference
    assert all(float(cells[2]) > 0 and float(cells[4]) > 0 for cells in rows.values())  # images/s measured
    assert float(rows["student depth 2, width 64"][0].rstrip("M")) > float(rows["student depth 1, width 32"][0].rstrip("M"))
