"""Mistakes on the command line, in config files and in pipeline files: one line each, naming what is
accepted; a pipeline stage counts as finished only when it trained."""
import json
from pathlib import Path

import pytest
import yaml

from distill.cli import cli_main
from distill.commands.pipeline import finished, load_spec
from distill.common.errors import UserError
from tests.helpers import ROOT, distill_args, run_cli_error


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
