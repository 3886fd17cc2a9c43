"""The benchmark scripts run (their figures are measured by hand, see README: not timed here)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_speed_prints_one_row_per_setting_with_the_ratio_to_the_plain_loop():
    rows = "plain,timm_task,fit_cache_ddp_2x1"  # the three code paths: a plain loop, timm's task, fit (cache, DDP)
    run = subprocess.run(
        [sys.executable, "benchmarks/train_speed.py", "--student=deit_tiny", "--teacher=test_resnet", "--img-size=32",
         "--batch=4", "--classes=10", "--steps=2", "--warmup=1", f"--rows={rows}", "--threads=1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows.split(","))  # header + one line per row: none failed
    assert table[1].split("|")[3].strip() == "1.00"  # the plain loop is the reference
    assert "timm.task.TokenDistillationTask" in run.stdout and "DDP 2 processes x 1 thread" in run.stdout
