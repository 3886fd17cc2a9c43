"""Mistakes on the command line, in config files and in pipeline files: one line each, naming what is
accepted; a pipeline stage counts as finished only when it trained."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.cli import cli_main
from distill.commands.pipeline import finished, load_spec, stage_command
from distill.common.errors import UserError
from tests.helpers import ROOT, distill_args, files_under, run_cli_error, small_filesystem


def test_the_pipeline_counts_a_stage_finished_only_when_it_trained_and_its_checkpoint_exists(tmp_path):
    best = tmp_path / "best.ckpt"
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"steps": 0, "best_checkpoint": str(best)}))
    best.write_bytes(b"x")
    assert finished(result) is None  # trained nothing
    result.write_text(json.dumps({"steps": 12, "best_checkpoint": str(tmp_path / "gone.ckpt")}))
    assert finished(result) is None  # its checkpoint is missing
    result.write_text(json.dumps({"steps": 12, "best_checkpoint": str(best)}))
    assert finished(result)["steps"] == 12


def test_the_pipeline_reads_its_stage_configs_relative_to_its_own_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the repository
    spec = load_spec(ROOT / "configs" / "pipeline.yaml")
    assert [Path(s["config"]) for s in spec["stages"]] == [
        ROOT / "configs" / "teacher.yaml", ROOT / "configs" / "distill.yaml", ROOT / "configs" / "distill.yaml"]
    moved = tmp_path / "elsewhere" / "pipeline.yaml"
    moved.parent.mkdir()
    moved.write_text((ROOT / "configs" / "pipeline.yaml").read_text())
    with pytest.raises(UserError, match="stage teacher: config 'teacher.yaml' does not exist .*relative to the pipeline"):
        load_spec(moved)


@pytest.mark.parametrize("content, expected", [
    ("", "a config must be a mapping of options (model:, data:, trainer:, ...) but the file is empty"),
    ("- model\n- data\n", "but the file holds a list"),
    ("model:\n\tlr: 0.1\n", "not valid YAML at line 2, column 1"),
])
def test_a_config_file_that_is_not_a_mapping_of_options_is_named(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    line = run_cli_error([*distill_args(tmp_path), "--config", str(bad)], capsys)
    assert f"{bad}: " in line and expected in line


def test_a_missing_config_file_is_named_before_torch_lightning_and_timm_load():
    """The check runs before the training command's imports (seconds): the line comes at once."""
    code = ("import sys\nfrom distill.cli import cli_main\n"
            "try:\n    cli_main(['fit', '--config', 'configs/distill.yml'])\n"
            "except SystemExit as err:\n    print(err.code, sorted({'torch', 'pytorch_lightning', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=False)
    assert out.stdout.split() == ["2", "[]"], out.stderr  # exit code 2, none of them imported
    assert out.stderr.startswith("error: config: 'configs/distill.yml' does not exist; give a YAML file of options")


def test_a_key_given_twice_in_a_config_is_named(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("data:\n  batch_size: 16\nmodel:\n  lr: 0.001\ndata:\n  num_workers: 0\n")
    line = run_cli_error([*distill_args(tmp_path), "--config", str(twice)], capsys)
    assert f"{twice}: not valid YAML at line 5" in line and "the key 'data' is given twice (first at line 1)" in line


def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch):
    import distill.commands.fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.commands.fit, "make_cli", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / "distill.yaml")])
    assert exit_info.value.code == 130 and "interrupted (Ctrl+C)" in capsys.readouterr().err


def test_distill_alone_lists_every_command(capsys):
    cli_main([])
    text = capsys.readouterr().out
    assert all(name in text for name in ("fit", "pipeline", "compare", "export", "predict", "cache-teacher", "report"))


@pytest.mark.parametrize("args, message", [
    (["fitt", "--config", "configs/distill.yaml"], "'fitt' is not a command; did you mean 'fit'?"),
    (["exprot", "--ckpt", "best.ckpt"], "'exprot' is not a command; did you mean 'export'?"),
    (["predict", "--images", "photos"], "predict: give --export DIR --images FOLDER"),  # forgot --export
    (["predict"], "or --config FILE --ckpt_path CKPT for LightningCLI's predict"),
], ids=["typo-fit", "typo-export", "predict-without-export", "predict-alone"])
def test_a_mistyped_or_incomplete_command_is_one_line_naming_what_is_accepted(args, message, capsys):
    assert message in run_cli_error(args, capsys)


@pytest.mark.parametrize("export, message", [
    ({"from": "finetune_48", "int8": "false"}, "export.int8 must be true or false, got 'false'"),
    ({"from": "finetune_48", "onnx": False, "int8": True}, "export.int8 quantizes the ONNX model: set export.onnx"),
])
def test_a_pipeline_export_that_cannot_work_is_refused_before_any_stage_trains(tmp_path, export, message):
    spec = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    spec["export"] = export
    for stage in spec["stages"]:
        stage["config"] = str(ROOT / "configs" / stage["config"])
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message):
        load_spec(tmp_path / "pipeline.yaml")


def test_a_failed_pipeline_stage_is_one_error_line_and_its_exit_code(tmp_path, monkeypatch, capsys):
    import distill.commands.pipeline

    monkeypatch.setattr(distill.commands.pipeline, "_run_stage", lambda command: 2)  # the stage printed its own error line
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", "--config", str(ROOT / "configs" / "pipeline.yaml"), "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" not in err and "[pipeline] stage 'teacher' failed (exit 2, its error is above)" in err


def two_stages(name: object = "p", first: object = "teacher", second: object = "distill", **overrides) -> dict:
    return {"name": name, "stages": [
        {"name": first, "config": str(ROOT / "configs" / "teacher.yaml"), "overrides": overrides or None},
        {"name": second, "config": str(ROOT / "configs" / "distill.yaml")}]}


def files_below(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize("spec, extra, expected", [
    (two_stages(name="../../pname"), [], "name '../../pname' holds a path separator"),
    (two_stages(second="ABSOLUTE"), [], "stages[1].name '"),  # tmp_path / "elsewhere": a path separator
    (two_stages(second="export"), [], "stages[1].name 'export' is taken by the pipeline's export folder"),
    (two_stages(second="Export"), [], "stages[1].name 'Export' is taken by the pipeline's export folder"),
    (two_stages(name=""), [], "name '' is empty"),
    (two_stages(first=".."), [], "stages[0].name '..' starts with '.'"),
    (two_stages(first="teacher\n"), [], "stages[0].name 'teacher\\n' holds '\\n'"),
    (two_stages(first=48), [], "stages[0].name 48 is not text (a number; quote it)"),
    (two_stages(second="Teacher"), [], "stages 'teacher' and 'Teacher' differ only in case"),
    (two_stages(**{"checkpoint.dirpath": "/tmp/elsewhere"}), [], "overrides: checkpoint.dirpath is set by the"),
    (two_stages(checkpoint={"filename": "../best"}), [], "overrides: checkpoint.filename is set by the pipeline"),
    (two_stages(**{"trainer.logger.init_args.version": "../../v"}), [],
     "overrides.trainer.logger.init_args.version '../../v' holds a path separator"),
    (two_stages(), ["--trainer.logger.init_args.version", "checkpoints"],
     "--trainer.logger.init_args.version 'checkpoints' is taken by the stage's own checkpoints"),
], ids=["pipeline-name-up", "stage-name-absolute", "stage-export", "stage-Export", "pipeline-name-empty",
        "stage-dotdot", "stage-newline", "stage-number", "stages-differ-in-case", "override-dirpath",
        "override-filename-nested", "override-version", "extra-version"])
def test_a_name_that_is_not_one_folder_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, spec,
                                                                              extra, expected):
    import distill.commands.pipeline

    monkeypatch.setattr(distill.commands.pipeline, "_run_stage", lambda command: pytest.fail("a stage started"))
    monkeypatch.chdir(tmp_path)
    if spec["stages"][1]["name"] == "ABSOLUTE":
        spec = {**spec, "stages": [spec["stages"][0], {**spec["stages"][1], "name": str(tmp_path / "elsewhere")}]}
        expected += str(tmp_path)[:40]  # a value over 80 characters is shown cut, its reason whole
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    before = files_below(tmp_path)
    line = run_cli_error(["pipeline", "--config", "pipeline.yaml", "--root", str(tmp_path / "out" / "root"), *extra],
                         capsys)
    assert expected in line
    assert files_below(tmp_path) == before  # nothing written, in root or beside it (`../../pname` is tmp_path/pname)


def test_a_logger_version_in_a_stage_config_file_is_a_name_too(tmp_path):
    (tmp_path / "stage.yaml").write_text("trainer:\n  logger:\n    init_args:\n      version: ../../logs\n")
    spec = two_stages()
    spec["stages"][0]["config"] = "stage.yaml"
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=r"stage.yaml: trainer.logger.init_args.version '../../logs' holds a path"):
        load_spec(tmp_path / "pipeline.yaml")


def test_a_stage_keeps_its_best_checkpoint_where_later_stages_read_it(tmp_path):
    (tmp_path / "stage.yaml").write_text("checkpoint:\n  filename: '{epoch}'\n")  # a fit config's own naming
    spec = two_stages(second="distill-v1.2")  # letters, digits, '_', '-' and '.' make a name
    spec["stages"][0]["config"] = "stage.yaml"
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    stage = load_spec(tmp_path / "pipeline.yaml")["stages"][0]
    assert "--checkpoint.filename=best" in stage_command(stage, tmp_path, [])  # after --config: it wins


# ---------------------------------------------------------------------------------------------
# A checkpoint pointed at and absent is never a fresh start; batches BatchNorm cannot train on; a full disk


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_last_without_a_last_checkpoint_is_refused_and_the_finished_run_is_kept(tmp_path, capsys, command):
    args = distill_args(tmp_path)
    cli_main(args)
    (tmp_path / "ckpt" / "last.ckpt").unlink()
    before = files_under(tmp_path)
    line = run_cli_error([command, *args[1:], "--ckpt_path=last", "--model.lr=0.1"], capsys)
    resume = " to resume" if command == "fit" else ""  # validate evaluates: it is told to name a checkpoint
    assert line.startswith(f"error: ckpt_path: 'last': '{tmp_path / 'ckpt'}' holds no last.ckpt{resume} (it holds "
                           "best.ckpt)")
    assert files_under(tmp_path) == before  # best.ckpt and every curve as they were
    fresh = tmp_path / "fresh"
    line = run_cli_error([command, *args[1:], "--ckpt_path=last", f"--checkpoint.dirpath={fresh}"], capsys)
    assert line.startswith(f"error: ckpt_path: 'last': '{fresh}' holds no checkpoint{resume} (it does not exist)")
    assert ("drop --ckpt_path" in line) == (command == "fit")
    assert not fresh.exists()


def test_batches_of_one_image_for_a_student_with_batch_norm_are_one_line_before_training(tmp_path, capsys):
    line = run_cli_error(["fit", "--config", str(ROOT / "configs" / "teacher.yaml"), "--data.batch_size=1",
                          "--model.student.init_args.model_name=test_resnet", f"--checkpoint.dirpath={tmp_path / 'c'}",
                          f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"], capsys)
    assert line.startswith("error: data.batch_size 1: the student has ") and "BatchNorm layer(s)" in line
    assert "use data.batch_size 2 or more" in line and not list(tmp_path.iterdir())


def test_a_first_fit_onto_a_full_disk_says_nothing_was_saved_and_leaves_no_folder(tmp_path, capsys):
    with small_filesystem(tmp_path / "small", "size=400k") as small:  # room for the write check, not a checkpoint
        args = [*distill_args(tmp_path), f"--checkpoint.dirpath={small / 'ckpt'}"]
        line = run_cli_error(args, capsys)
        assert line.startswith(f"error: checkpoint.dirpath: no space left to write '{small / 'ckpt'}/")
        assert "nothing was saved yet: free disk space and run the same command again" in line
        assert not list(small.iterdir())


def test_a_fit_onto_a_full_disk_is_refused_before_it_starts_and_leaves_nothing(tmp_path, capsys, full_disk):
    line = run_cli_error([*distill_args(tmp_path), f"--checkpoint.dirpath={full_disk / 'ckpt'}"], capsys)
    assert line.startswith(f"error: checkpoint.dirpath: cannot write to '{full_disk / 'ckpt'}' (No space left on "
                           "device); free disk space")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_the_pipelines_int8_budget_reaches_its_export_and_a_bad_one_is_one_line(tmp_path):
    from distill.commands.pipeline import export_command

    spec = load_spec(ROOT / "configs" / "pipeline.yaml")
    command = export_command(spec["export"], tmp_path / "best.ckpt", tmp_path / "export")
    assert "--int8" in command and f"--int8_max_drop={spec['export']['int8_max_drop']}" in command
    broken = tmp_path / "p.yaml"
    broken.write_text((ROOT / "configs" / "pipeline.yaml").read_text().replace("int8_max_drop: 1.0", "int8_max_drop: -1")
                      .replace("config: ", f"config: {ROOT / 'configs'}/"))
    with pytest.raises(UserError, match=r"export.int8_max_drop must be a number of points, 0 or more, got -1"):
        load_spec(broken)
