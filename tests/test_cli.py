"""The `distill` / `lightning` commands: every config parses and instantiates, entry points print configs."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml
from safetensors.torch import save_file

from distill.cli import make_cli
from distill.module import DistillationModule

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = [ROOT / "configs" / "pipeline.yaml"]
CONFIGS = sorted(set(ROOT.glob("configs/*.yaml")) - set(PIPELINES))  # configs/imagenet/: tests of their own
BIN = Path(sys.executable).parent


def random_teacher_file(tmp_path: Path, model_name: str, num_classes: int) -> Path:
    path = tmp_path / f"{model_name}_{num_classes}.safetensors"
    save_file(timm.create_model(model_name.split(".")[0], num_classes=num_classes).state_dict(), str(path))
    return path


def config_overrides(config: Path, tmp_path: Path) -> list[str]:
    """Point a config's outputs into tmp_path, and its teacher (if any) at random weights."""
    args = ["--config", str(config), "--data.num_workers=0", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    teacher = (yaml.safe_load(config.read_text()).get("model") or {}).get("teacher")
    if teacher:
        path = random_teacher_file(tmp_path, teacher["init_args"]["model_name"], 10)
        args.append(f"--model.teacher.init_args.weights={path}")
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_instantiates(config, tmp_path):
    cli = make_cli(config_overrides(config, tmp_path), run=False)
    assert isinstance(cli.model, DistillationModule)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes  # linked, not copied
    assert cli.model.hparams.img_size == cli.datamodule.img_size
    assert cli.datamodule.hparams.label_smoothing == cli.model.hparams.label_smoothing
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "ckpt")


def test_distill_config_is_hard_distillation_from_the_teacher_run(tmp_path):
    config = yaml.safe_load((ROOT / "configs/distill.yaml").read_text())
    teacher = yaml.safe_load((ROOT / "configs/teacher.yaml").read_text())
    assert config["model"]["distillation"] == "hard"
    assert config["model"]["teacher"]["init_args"]["weights"] == f"{teacher['checkpoint']['dirpath']}/best.ckpt"
    assert config["model"]["teacher"]["init_args"]["model_name"] == teacher["model"]["student"]["init_args"]["model_name"]


@pytest.mark.parametrize("command", [["distill"], ["lightning"], ["python", "-m", "distill"]])
def test_each_entry_point_prints_the_config(command):
    exe = [sys.executable, *command[1:]] if command[0] == "python" else [str(BIN / command[0])]
    out = subprocess.run([*exe, "fit", "--config", str(ROOT / "configs/teacher.yaml"), "--print_config"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["student"]["init_args"]["model_name"] == "resnet10t"
    assert printed["checkpoint"]["monitor"] == "val/acc"
