"""The `distill` / `lightning` commands: every config parses and instantiates, entry points print configs."""
import importlib
import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml
from tqdm import tqdm

from distill.cli import COMMANDS, TRAINING, cli_main
from distill.common.console import quiet_console
from distill.training.cli import make_cli
from distill.training.losses import DistillationLoss
from distill.training.module import DistillationModule
from teachers import TeacherEnsemble
from tests.helpers import config_overrides

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = [ROOT / "configs" / name for name in ("pipeline.yaml", "own_data.yaml", "check_data.yaml")]
CONFIGS = sorted(set(ROOT.glob("configs/*.yaml")) - set(PIPELINES))  # configs/imagenet/: tests of their own
OVERLAYS = sorted(ROOT.glob("configs/students/*.yaml"))  # each applied on top of configs/distill.yaml
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_instantiates(config, tmp_path):
    cli = make_cli(config_overrides(config, tmp_path), run=False)
    assert isinstance(cli.model, DistillationModule)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes  # linked, not copied
    assert cli.model.hparams.img_size == cli.datamodule.img_size
    assert cli.datamodule.hparams.label_smoothing == cli.model.hparams.label_smoothing
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "ckpt")


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_pipeline_file_loads_and_each_stage_config_parses_with_its_overrides(pipeline, tmp_path):
    from distill.commands.pipeline import load_spec

    for stage in load_spec(pipeline)["stages"]:
        overrides = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (stage.get("overrides") or {}).items()]
        cli = make_cli([*config_overrides(Path(stage["config"]), tmp_path), *overrides], run=False)
        assert isinstance(cli.model, DistillationModule)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[c.name for c in OVERLAYS])
def test_every_student_overlay_parses_on_the_recipe_and_keeps_its_recipe(overlay, tmp_path):
    base = config_overrides(ROOT / "configs" / "distill.yaml", tmp_path)
    cli = make_cli([*base[:2], "--config", str(overlay), *base[2:]], run=False)  # as a user types it
    recipe, student = yaml.safe_load((ROOT / "configs/distill.yaml").read_text()), cli.model.student
    chosen = yaml.safe_load(overlay.read_text())["model"]["student"]["init_args"]
    kept = recipe["model"]["student"]["init_args"]
    assert any(chosen[key] != kept.get(key) for key in chosen)  # it changes the student
    assert all(student.config[key] == value for key, value in chosen.items())  # applied
    assert all(student.config[key] == value for key, value in kept.items() if key not in chosen)  # the rest: recipe's
    assert student.model.patch_embed.grid_size == (4, 4)
    assert cli.model.hparams.distillation == recipe["model"]["distillation"]
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "ckpt")


def test_the_no_teacher_baseline_runs_no_teacher_with_the_teachers_augmentation(tmp_path):
    base = config_overrides(ROOT / "configs" / "distill.yaml", tmp_path)
    overlay = ROOT / "configs" / "baselines" / "no_teacher.yaml"
    args = [*base[:2], "--config", str(overlay), *[a for a in base[2:] if not a.startswith("--model.teacher")]]
    cli = make_cli(args, run=False)  # the recipe's teacher file need not exist: none builds no teacher
    assert cli.model.teacher is None and cli.model.imitation is None and cli.model.hparams.distillation == "none"
    teacher = yaml.safe_load((ROOT / "configs" / "teacher.yaml").read_text())["data"]
    for key in ("auto_augment", "re_prob", "scale", "mixup", "cutmix"):
        assert cli.datamodule.hparams[key] == (tuple(teacher[key]) if key == "scale" else teacher[key]), key
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "ckpt")


def test_the_losss_options_are_declared_once_and_stay_the_models_flat_keys(tmp_path):
    loss_keys = set(inspect.signature(DistillationLoss).parameters)
    assert not loss_keys & set(inspect.signature(DistillationModule).parameters)  # declared by the loss alone
    cli = make_cli([*config_overrides(ROOT / "configs" / "distill.yaml", tmp_path), "--model.alpha=0.3", "--model.tau=2"],
                   run=False)
    assert cli.model.loss.alpha == 0.3 and cli.model.loss.method.tau == 2.0 and cli.model.hparams.alpha == 0.3
    assert loss_keys <= set(cli.model.hparams)  # recorded flat, defaults too (validate --ckpt_path passes them back)
    assert cli.model.hparams.kl_normalization == inspect.signature(DistillationLoss).parameters["kl_normalization"].default


@pytest.mark.parametrize("overlay, folder", [("ensemble.yaml", "teacher_seed"), ("ensemble_200.yaml", "teacher200_seed"),
                                             ("ensemble_500.yaml", "teacher500_seed")])
def test_each_ensemble_overlay_reads_the_three_teacher_runs_its_comment_trains(overlay, folder, tmp_path, monkeypatch):
    overlay = ROOT / "configs" / "teachers" / overlay
    members = yaml.safe_load(overlay.read_text())["model"]["teacher"]
    monkeypatch.chdir(tmp_path)  # the overlay names runs/<folder><s>/checkpoints/best.ckpt, relative to the run
    for seed, member in enumerate(members):
        assert member["init_args"]["weights"] == f"runs/{folder}{seed}/checkpoints/best.ckpt"
        assert f"--checkpoint.dirpath runs/{folder}{seed}/checkpoints" in overlay.read_text().replace("$s", str(seed))
        path = tmp_path / member["init_args"]["weights"]
        path.parent.mkdir(parents=True)
        torch.save(timm.create_model(member["init_args"]["model_name"], num_classes=10).state_dict(), path)
    base = config_overrides(ROOT / "configs" / "distill.yaml", tmp_path)
    cli = make_cli([*base[:2], "--config", str(overlay), *[a for a in base[2:] if "teacher" not in a]], run=False)
    assert isinstance(cli.model.teacher, TeacherEnsemble) and len(cli.model.teacher) == 3
    assert cli.model.hparams.distillation == yaml.safe_load((ROOT / "configs/distill.yaml").read_text())["model"]["distillation"]


def test_distill_config_distils_from_the_teacher_run(tmp_path):
    config = yaml.safe_load((ROOT / "configs/distill.yaml").read_text())
    teacher = yaml.safe_load((ROOT / "configs/teacher.yaml").read_text())
    assert config["model"]["distillation"] != "none"
    assert config["model"]["teacher"]["init_args"]["weights"] == f"{teacher['checkpoint']['dirpath']}/best.ckpt"
    assert config["model"]["teacher"]["init_args"]["model_name"] == teacher["model"]["student"]["init_args"]["model_name"]


def test_python_m_distill_prints_the_config():
    out = subprocess.run([sys.executable, "-m", "distill", "fit", "--config", str(ROOT / "configs/teacher.yaml"),
                          "--print_config"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["student"]["init_args"]["model_name"] == "resnet10t"
    assert printed["checkpoint"]["monitor"] == "val/acc"


@pytest.mark.parametrize("script", ["distill", "lightning"])
def test_each_console_script_is_the_same_command_and_runs(script):
    # the same function as `python -m distill` (whose config printing is checked above), installed and runnable
    ours = [e for e in importlib.metadata.entry_points(group="console_scripts", name=script)
            if e.dist.name == "deit-distill"]
    assert [e.value for e in ours] == ["distill.cli:cli_main"]
    installed = (BIN / script).read_text()
    # litserve (and the `lightning` package) install a `lightning` command too: the last package installed wins
    assert "from distill.cli import cli_main" in installed, f"{BIN / script} is another package's: pip install -e ."
    out = subprocess.run([str(BIN / script)], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0 and "fit, validate, test, predict" in out.stdout, out.stderr


def test_every_command_of_the_table_is_listed_and_runs_its_module_main(capsys):
    cli_main([])
    listed = capsys.readouterr().out
    for name, (module, line) in COMMANDS.items():
        assert name in TRAINING or f"  {name.split()[0]:15s} {line}" in listed
        assert callable(importlib.import_module(module).main), module
    assert "fit, validate, test, predict" in listed


def test_predict_help_is_the_export_predictors_and_says_how_to_get_lightningclis(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--export" in text and "--images" in text and "--top_k" in text
    assert "--trainer.max_epochs" not in text and "distill predict --config FILE --help" in " ".join(text.split())
    with pytest.raises(SystemExit):
        cli_main(["predict", "--config", str(ROOT / "configs" / "distill.yaml"), "--help"])
    assert "--trainer.max_epochs" in capsys.readouterr().out  # with a config: LightningCLI's predict


def test_a_warning_is_one_whole_line_above_the_progress_bar(capsys):
    """Python's default adds the warning's source line on a line of its own, which a redrawn bar leaves bare."""
    with quiet_console(), tqdm(total=2, file=sys.stderr) as bar:
        bar.update(1)
        warnings.warn("teacher: stays in fp32", UserWarning)
        bar.update(1)
    lines = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.splitlines()]  # as the terminal shows them
    warned = [line for line in lines if "teacher: stays in fp32" in line]
    assert len(warned) == 1
    assert warned[0].startswith("UserWarning: teacher: stays in fp32 (test_commands_and_configs.py:")
    assert not any("warnings.warn(" in line for line in lines)


def test_the_projects_own_lines_go_through_say_not_the_lightning_logger_the_console_quiets():
    users = [str(path.relative_to(ROOT)) for folder in ("distill", "students", "teachers")
             for path in (ROOT / folder).rglob("*.py") if "rank_zero_info" in path.read_text()]
    assert not users, f"{users}: use distill.common.console.say (rank_zero_info's lines are left out of the console)"


def test_the_recipes_table_says_what_the_configs_do():
    """docs/recipes.md's table of configs states epochs and distillation type: read them back from the files."""
    rows = {line.split("|")[1].strip(): line for line in (ROOT / "docs" / "recipes.md").read_text().splitlines()
            if line.startswith("| `configs/")}
    recipe = yaml.safe_load((ROOT / "configs" / "distill.yaml").read_text())
    row = rows["`configs/distill.yaml`"]
    assert f"{recipe['model']['distillation']} distillation" in row and f"{recipe['trainer']['max_epochs']} epochs" in row
    for name, row in rows.items():  # the student a config (or an overlay) sets is the one its row names
        path = ROOT / name.split("`")[1]
        student = (yaml.safe_load(path.read_text()).get("model") or {}).get("student") or {}
        model_name = (student.get("init_args") or {}).get("model_name")
        assert model_name is None or f"`{model_name}`" in row, f"docs/recipes.md's row of {name} does not name {model_name}"
    teacher = yaml.safe_load((ROOT / "configs" / "teacher.yaml").read_text())
    assert f"{teacher['trainer']['max_epochs']} epochs" in rows["`configs/teacher.yaml`"]
    stages = {s["name"]: s for s in yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())["stages"]}
    epochs = [stages[name]["overrides"]["trainer.max_epochs"] for name in ("distill", "finetune_48")]
    assert f"{epochs[0]} (32 px) and {epochs[1]} (48 px)" in rows["`configs/pipeline.yaml`"]


def test_no_config_comment_holds_a_measured_figure_that_would_go_stale():
    """Figures live in docs/ beside the command that reproduces them (or the paper that states them); a config
    comment says why and links there."""
    figure = re.compile(r"#.*\d(\.\d+)? ?(%|s\b|min\b|minutes\b|days?\b|hours?\b)")
    found = [f"{path.relative_to(ROOT)}:{number}" for path in sorted(ROOT.glob("configs/**/*.yaml"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if figure.search(line)]
    assert not found, found
