"""A result is identified by what it was made from (content, not paths or command lines), and an output whose
source changed is redone or refused, never skipped in silence. The cases, as users met them:

- fit: `--ckpt_path last` with a changed option, and a resume after the config file was edited, are refused
  (the checkpoint records the resolved options); the same options resume.
- pipeline: a stage is the same from another folder or by another spelling of the config's path; an edited
  stage config, changed overrides, or a retrained upstream stage is refused naming what changed; a stage that
  failed on a bad option (nothing trained) starts again; the export runs again after a stage was retrained.
- export: one made from the same checkpoint bytes with the same options is kept; another checkpoint or other
  options is refused without --overwrite (replaced with it); leftovers of a killed export are cleaned.
- compare: an edited config file is refused for runs made from the old one; a run that failed on a bad option
  does not block the fixed command; another comparison into the same --out does not replace the table.
- fit's outputs: without a logger each run's config.yaml is beside its checkpoints (not one `runs/config.yaml`
  replaced by every run); no `runs/` in the current folder when outputs go elsewhere; a failed fit leaves no
  empty checkpoint or TensorBoard folders.

Every refusal: exit code 2, one `error:` line, earlier outputs byte-identical.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import distill.commands.pipeline
import distill.training.module
from distill.cli import cli_main
from distill.commands.compare import check_same_options, plan_runs
from distill.commands.pipeline import _check_unchanged, stage_identity
from distill.common.errors import UsageError, UserError
from distill.commands.export import export_student
from distill.training.cli import fit_options
from tests.helpers import ROOT, distill_args, run_cli_error


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


# ---------------------------------------------------------------------------------------------
# fit: a resumed run continues the run its checkpoint was saved by


@pytest.fixture(scope="module")
def finished_fit(tmp_path_factory) -> tuple[list[str], Path]:
    """A tiny fit without a logger, run from its own folder, whose options partly come from a config file of the
    user's (mine.yaml). Tests leave it as they found it."""
    folder = tmp_path_factory.mktemp("fit")
    mine = folder / "mine.yaml"
    mine.write_text("model:\n  lr: 0.001\n")
    args = [*distill_args(folder), "--config", str(mine), "--trainer.logger=false"]
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cli_main(args)
    finally:
        os.chdir(cwd)
    return args, mine


def test_resuming_with_ckpt_path_last_and_a_changed_option_is_refused(capsys, finished_fit):
    args, mine = finished_fit
    ckpt = mine.parent / "ckpt"
    before = snapshot(ckpt)
    line = run_cli_error([*args, "--ckpt_path", "last", "--model.lr", "0.01"], capsys)
    assert f"ckpt_path: 'last' ({ckpt / 'last.ckpt'}) was saved by a run with other options" in line
    assert "model.lr: 0.001 -> 0.01" in line and "--model.init_from" in line
    assert snapshot(ckpt) == before


def test_resuming_after_the_config_file_was_edited_is_refused(capsys, finished_fit):
    args, mine = finished_fit
    ckpt = mine.parent / "ckpt"
    before = snapshot(ckpt)
    mine.write_text("model:\n  lr: 0.002\n")  # the same path, other content
    try:
        line = run_cli_error([*args, f"--ckpt_path={ckpt / 'last.ckpt'}"], capsys)
    finally:
        mine.write_text("model:\n  lr: 0.001\n")
    assert "was saved by a run with other options (model.lr: 0.001 -> 0.002" in line
    assert snapshot(ckpt) == before


def test_a_teacher_file_is_the_same_teacher_under_another_path(tmp_path, finished_fit):
    args, mine = finished_fit
    weights = next(a for a in args if a.startswith("--model.teacher.init_args.weights="))
    copy = tmp_path / "teacher.safetensors"
    shutil.copy(weights.split("=", 1)[1], copy)
    moved = [a if a != weights else f"--model.teacher.init_args.weights={copy}" for a in args]
    before = {p.name: p.read_bytes() for p in (mine.parent / "ckpt").glob("*.ckpt")}
    cli_main([*moved, "--ckpt_path", "last"])  # resumed (at its last epoch already: nothing more to train)
    assert {p.name: p.read_bytes() for p in (mine.parent / "ckpt").glob("*.ckpt")} == before


def test_a_local_dir_teacher_is_its_folders_content_and_a_missing_one_is_named(tmp_path, monkeypatch):
    """`model_name: local-dir:FOLDER` (timm loads the folder): the run is made from what the folder holds, so a
    folder written again is another teacher; a folder that is not there is one line before any run."""
    from distill.common.checkpoints import check_teacher_weights
    from distill.common.errors import UserError
    from distill.common.identity import as_recorded_now, describe_differences, options_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text('{"architecture": "resnet10t"}')
    options = {"model.teacher.init_args.model_name": "local-dir:export", "model.teacher.init_args.weights": "none"}
    before = options_identity(options)
    assert before["model.teacher.init_args.model_name"].startswith("local-dir:sha256:")
    assert options_identity({**options, "model.teacher.init_args.model_name": f"local-dir:{tmp_path / 'export'}"}) \
        == before  # the same folder named by another path
    assert as_recorded_now(options) == before  # a run recorded by the folder's name, before this rule, is the same
    (tmp_path / "export" / "config.json").write_text('{"architecture": "resnet18"}')
    now = options_identity(options)
    assert "model.teacher.init_args.model_name: its content changed" in describe_differences(before, now)
    check_teacher_weights(now, "compare")  # there: nothing to say
    with pytest.raises(UserError, match=r"compare: model.teacher: model_name 'local-dir:missing' names no folder"):
        check_teacher_weights(options_identity({**options, "model.teacher.init_args.model_name": "local-dir:missing"}),
                              "compare")


# ---------------------------------------------------------------------------------------------
# fit's own outputs


def test_without_a_logger_the_runs_config_is_beside_its_checkpoints_and_no_runs_folder_is_made(finished_fit):
    folder = finished_fit[1].parent  # the fit ran from here, its outputs elsewhere
    assert f"dirpath: {folder / 'ckpt'}" in (folder / "ckpt" / "config.yaml").read_text()
    assert not (folder / "runs").exists()  # neither one config.yaml every run replaces nor an empty runs/


def test_a_failed_fit_leaves_no_empty_output_folders(tmp_path, capsys, monkeypatch):
    def fails(self) -> None:
        raise UserError("the data moved away")

    monkeypatch.setattr(distill.training.module.DistillationModule, "on_fit_start", fails)
    args = distill_args(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "the data moved away" in run_cli_error(args, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no ckpt/, no runs/distill/version_0/


# ---------------------------------------------------------------------------------------------
# pipeline: a stage is its merged options and its upstream checkpoints, by content


def copy_configs(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("teacher.yaml", "distill.yaml"):
        shutil.copy(ROOT / "configs" / name, folder / name)
    return folder


def finished_stage(root: Path, stage: dict, extra: list[str] = ()) -> None:
    """A stage folder as a finished `distill fit` leaves it (result.json, best.ckpt) and its stage.json."""
    folder = root / stage["name"]
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "best.ckpt").write_bytes(f"weights of {stage['name']}".encode())
    (folder / "result.json").write_text(json.dumps({"steps": 3, "best_checkpoint": str(folder / "checkpoints" / "best.ckpt")}))
    (folder / "stage.json").write_text(json.dumps(stage_identity(stage, root, list(extra))))


def test_a_pipeline_stage_is_the_same_from_another_folder_or_path_spelling(tmp_path, monkeypatch):
    configs = copy_configs(tmp_path / "pipe")
    root = tmp_path / "runs"
    absolute = {"name": "teacher", "config": str(configs / "teacher.yaml")}
    finished_stage(root, absolute)
    monkeypatch.chdir(tmp_path / "pipe")
    relative = {"name": "teacher", "config": os.path.join("..", "pipe", "teacher.yaml")}
    _check_unchanged(relative, root, stage_identity(relative, root, []))  # not refused: the same content


def test_a_pipeline_stage_whose_config_file_or_overrides_changed_is_refused(tmp_path):
    configs = copy_configs(tmp_path / "pipe")
    root = tmp_path / "runs"
    stage = {"name": "teacher", "config": str(configs / "teacher.yaml"), "overrides": {"trainer.max_epochs": 8}}
    finished_stage(root, stage)
    edited = yaml.safe_load((configs / "teacher.yaml").read_text())
    edited["model"]["lr"] = 0.5
    (configs / "teacher.yaml").write_text(yaml.safe_dump(edited))  # edited in place: the same path
    with pytest.raises(UserError, match=r"stage 'teacher' .* its options changed \(model.lr: .* -> 0.5, as then"):
        _check_unchanged(stage, root, stage_identity(stage, root, []))
    shutil.copy(ROOT / "configs" / "teacher.yaml", configs / "teacher.yaml")
    _check_unchanged(stage, root, stage_identity(stage, root, []))  # restored: the same again
    with pytest.raises(UserError, match=r"trainer.max_epochs: 8 -> 9"):
        _check_unchanged(stage, root, stage_identity({**stage, "overrides": {"trainer.max_epochs": 9}}, root, []))
    with pytest.raises(UserError, match=r"model.lr: .* -> 0.1"):
        _check_unchanged(stage, root, stage_identity(stage, root, ["--model.lr", "0.1"]))


def test_a_stage_after_its_upstream_was_trained_again_is_refused_and_one_that_trained_nothing_restarts(tmp_path):
    configs = copy_configs(tmp_path / "pipe")
    root = tmp_path / "runs"
    teacher = {"name": "teacher", "config": str(configs / "teacher.yaml")}
    student = {"name": "distill", "config": str(configs / "distill.yaml"), "teacher_from": "teacher"}
    finished_stage(root, teacher)
    finished_stage(root, student)
    _check_unchanged(student, root, stage_identity(student, root, []))
    (root / "teacher" / "checkpoints" / "best.ckpt").write_bytes(b"weights of a retrained teacher")
    with pytest.raises(UserError, match=r"stage 'distill' .* the stage\(s\) it starts from \(teacher\) were trained "
                                        r"again since"):
        _check_unchanged(student, root, stage_identity(student, root, []))
    shutil.rmtree(root / "distill" / "checkpoints")
    (root / "distill" / "result.json").unlink()  # a stage that failed on a bad option: stage.json and nothing else
    _check_unchanged(student, root, stage_identity(student, root, ["--model.lr", "0.1"]))


def test_the_pipeline_runs_the_export_again_for_the_stage_it_exports(tmp_path, monkeypatch, capsys):
    configs = copy_configs(tmp_path / "pipe")
    spec = {"name": "p", "stages": [{"name": "teacher", "config": "teacher.yaml"}],
            "export": {"from": "teacher", "torchscript": False}}
    (configs / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    finished_stage(tmp_path / "p", {"name": "teacher", "config": str(configs / "teacher.yaml")})
    (tmp_path / "p" / "export").mkdir()
    (tmp_path / "p" / "export" / "export_report.json").write_text("{}")  # an export of other weights
    commands = []
    monkeypatch.setattr(distill.commands.pipeline, "_run_stage", lambda command: commands.append(command) or 0)
    cli_main(["pipeline", "--config", str(configs / "pipeline.yaml"), "--root", str(tmp_path)])
    assert "teacher: finished earlier, skipped" in capsys.readouterr().out
    (export,) = commands  # `distill export` decides by content whether the folder is current (tests below)
    assert export[3:5] == ["export", "--ckpt"] and "--overwrite_stale" in export and "--no-torchscript" in export


# ---------------------------------------------------------------------------------------------
# export: current only if made from the checkpoint's bytes with the same options


def test_an_export_is_kept_when_current_and_redone_or_refused_when_its_source_changed(trained, tmp_path, capsys):
    out, best = tmp_path / "export", trained / "ckpt" / "best.ckpt"
    copy = tmp_path / "copy_of_best.ckpt"
    shutil.copy(best, copy)
    export_student(best, out, onnx=False, torchscript=False)
    before = snapshot(out)
    cli_main(["export", "--ckpt", str(copy), "--out", str(out), "--no-onnx", "--no-torchscript"])
    assert "is already the export of" in capsys.readouterr().out and snapshot(out) == before  # same bytes, other path
    line = run_cli_error(["export", "--ckpt", str(trained / "ckpt" / "last.ckpt"), "--out", str(out), "--no-onnx",
                          "--no-torchscript"], capsys)
    assert "already exists (made from another checkpoint: its content differs); pass --overwrite" in line
    line = run_cli_error(["export", "--ckpt", str(best), "--out", str(out), "--no-onnx"], capsys)
    assert "already exists (made with other options: torchscript: false -> true); pass --overwrite" in line
    assert snapshot(out) == before
    report = export_student(trained / "ckpt" / "last.ckpt", out, onnx=False, torchscript=False, overwrite=True)
    assert report["checkpoint"].endswith("last.ckpt") and snapshot(out) != before


def test_an_export_whose_files_changed_is_not_current_and_a_killed_exports_leftovers_are_removed(trained, tmp_path,
                                                                                                  capsys):
    out, best = tmp_path / "export", trained / "ckpt" / "best.ckpt"
    export_student(best, out, onnx=False, torchscript=False)
    (out / "model.safetensors").write_bytes(b"replaced by hand")
    (tmp_path / ".export.tmp424242").mkdir()  # a SIGKILLed export's half-built folder
    (tmp_path / ".export.tmp424242" / "model.safetensors").write_bytes(b"half")
    line = run_cli_error(["export", "--ckpt", str(best), "--out", str(out), "--no-onnx", "--no-torchscript"], capsys)
    assert "already exists (its files changed since it was written, or were added or removed); pass" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ---------------------------------------------------------------------------------------------
# compare: a run folder is its merged options by content


def test_compare_refuses_runs_made_from_a_config_file_since_edited(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(ROOT / "configs" / "distill.yaml", recipe)
    (run,) = plan_runs(str(recipe), ["none"], [0], tmp_path / "c", [])
    (run["folder"] / "checkpoints").mkdir(parents=True)
    (run["folder"] / "checkpoints" / "last.ckpt").write_bytes(b"an interrupted run")
    (run["folder"] / "run.json").write_text(json.dumps({"options": run["options"]}))
    check_same_options([run])
    recipe.write_text(recipe.read_text().replace("lr: 1.0e-3", "lr: 5.0e-4"))
    with pytest.raises(UserError, match=r"was made earlier, but its options changed \(model.lr: 0.001 -> 0.0005, as then -> now\)"):
        check_same_options(plan_runs(str(recipe), ["none"], [0], tmp_path / "c", []))


def test_compare_after_a_run_that_failed_on_a_bad_option_accepts_the_fixed_command(tmp_path):
    with pytest.raises(UsageError, match=r"^compare: .*--model.lrr=1; did you mean 'model.lr'"):  # before any run
        plan_runs(str(ROOT / "configs" / "distill.yaml"), ["none"], [0], tmp_path / "c", ["--model.lrr=1"])
    assert not (tmp_path / "c").exists()
    folder = tmp_path / "c" / "none" / "seed_0"  # as a run of a version that let the bad option reach its fit left it
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"options": {"model.lrr": 1}}))
    (folder / "fit.log").write_text("error: model.lrr ...")  # nothing trained
    check_same_options(plan_runs(str(ROOT / "configs" / "distill.yaml"), ["none"], [0], tmp_path / "c", []))


def fake_finished_runs(out: Path, types: list[str], seeds: list[int], config: str) -> None:
    for run in plan_runs(config, types, seeds, out, []):
        (run["folder"] / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run["folder"] / "checkpoints" / "best.ckpt").write_bytes(b"w")
        (run["folder"] / "run.json").write_text(json.dumps({"options": run["options"]}))
        (run["folder"] / "result.json").write_text(json.dumps({
            "steps": 2, "best_checkpoint": str(run["folder"] / "checkpoints" / "best.ckpt"), "wall_time_s": 1.0,
            "final_metrics": {"val/acc": 0.5}, "metrics": {"val/acc": 0.6, "val/teacher_acc": 0.9}}))


def test_another_comparison_into_the_same_out_does_not_replace_its_table(tmp_path, capsys):
    config, out = str(ROOT / "configs" / "distill.yaml"), tmp_path / "c"
    fake_finished_runs(out, ["none", "soft"], [0, 1], config)
    compare = ["compare", "--config", config, "--out", str(out), "--jobs", "1"]
    cli_main([*compare, "--types", "none", "--seeds", "1"])
    cli_main([*compare, "--types", "none,soft", "--seeds", "2"])  # the same comparison, more runs: its table
    before = snapshot(out)
    line = run_cli_error([*compare, "--types", "soft", "--seeds", "2"], capsys)
    assert f"compare --out: '{out / 'compare.md'}' holds the table of another comparison (none, soft x 2 seed(s))" in line
    assert snapshot(out) == before
    cli_main([*compare, "--types", "soft", "--seeds", "2", "--overwrite"])
    assert json.loads((out / "compare.json").read_text())["made_from"]["runs"] == [["soft", 0], ["soft", 1]]


def test_fit_options_merge_config_files_in_order_then_the_command_line_as_fit_does(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # as in a fresh driver process
    base, overlay = tmp_path / "base.yaml", tmp_path / "overlay.yaml"
    base.write_text("model:\n  lr: 0.001\n  student:\n    class_path: students.Student\n    init_args: {depth: 6}\n"
                    "data:\n  img_size: 32\n")
    overlay.write_text("model:\n  student:\n    init_args: {embed_dim: 64}\ndata:\n  img_size: 48\n")
    options = fit_options(["--config", str(base), "-c", str(overlay), "--model.lr", "2e-3", "--trainer.devices=2"],
                          "test")
    assert (options["model.lr"], options["data.img_size"], options["trainer.devices"]) == (0.002, 48, 2)
    devices = tmp_path / "devices.yaml"
    devices.write_text("trainer:\n  devices: 2\n")  # the same count, from a file (jsonargparse gives it as 2, not '2')
    assert fit_options(["-c", str(base), "-c", str(overlay), "-c", str(devices), "--model.lr=2e-3"], "test") == options
    assert (options["model.student.init_args.depth"], options["model.student.init_args.embed_dim"]) == (6, 64)
    assert options["model.tau"] == 1.0  # defaults count: a run made before a default changed is another run
    assert "PL_GLOBAL_SEED" not in os.environ  # the parse seeds nothing a driver's children would inherit
    assert fit_options(["-c", str(base), "--model.lr=0.002"], "test") == fit_options(["-c", str(base), "--model.lr=2e-3"],
                                                                                    "test")
    with pytest.raises(UsageError, match="^compare: its distill fit options: .*model.lrr.*did you mean 'model.lr'"):
        fit_options(["-c", str(base), "--model.lrr=0.1"], "compare")  # the one-line error distill fit gives


def test_fit_options_are_what_the_run_records_in_its_checkpoints(finished_fit):
    import torch
    args, mine = finished_fit
    cwd = os.getcwd()
    os.chdir(mine.parent)
    try:
        options = fit_options(args[1:], "test")  # args: ["fit", ...]
    finally:
        os.chdir(cwd)
    recorded = torch.load(mine.parent / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["run_options"]
    assert options == recorded


def test_a_data_folder_is_the_same_named_from_another_folder_and_an_overlay_or_nested_override_counts(tmp_path,
                                                                                                     monkeypatch):
    (tmp_path / "A" / "images").mkdir(parents=True)
    (tmp_path / "B").mkdir()
    recipe = ["--config", str(ROOT / "configs" / "distill.yaml")]
    monkeypatch.chdir(tmp_path / "A")
    here = fit_options([*recipe, "--data.dataset=images"], "test")
    monkeypatch.chdir(tmp_path / "B")
    assert fit_options([*recipe, "--data.dataset", "../A/images"], "test") == here
    assert fit_options([*recipe, f"--data.dataset={tmp_path / 'A' / 'images'}"], "test") == here
    overlay = fit_options([*recipe, "-c", str(ROOT / "configs" / "students" / "deit.yaml")], "test")
    assert overlay != fit_options(recipe, "test") and overlay["model.student.init_args.model_name"] == "deit_tiny"
    nested = fit_options([*recipe, '--model.student.init_args={"depth": 2}'], "test")
    assert nested["model.student.init_args.depth"] == 2 and nested["model.student.init_args.embed_dim"] == 128


def test_a_failed_fit_removes_only_its_own_folders_and_the_parents_it_made_while_empty(tmp_path):
    from distill.training.run_records import RemoveUnusedOutputs

    shared = tmp_path / "sweep"  # made by whichever of two runs started first
    mine, theirs = shared / "lr1" / "version_0", shared / "lr2" / "version_0"
    unused = RemoveUnusedOutputs([mine, tmp_path / "ckpt"])
    for folder in (mine, theirs, tmp_path / "ckpt"):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("a run's config")
    unused.remove()
    assert not mine.exists() and not (shared / "lr1").exists() and not (tmp_path / "ckpt").exists()
    assert (theirs / "config.yaml").is_file()  # the other run's folder and the parent they share stay


def test_a_fit_that_trains_nothing_leaves_no_empty_folders(tmp_path, capsys):
    args = distill_args(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "took no optimiser step" in run_cli_error([*args, "--trainer.max_steps=0"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overwrite_rebuilds_a_current_export_and_a_stray_file_makes_it_stale(trained, tmp_path, capsys):
    out, best = tmp_path / "model[v2]", trained / "ckpt" / "best.ckpt"  # a name with glob characters
    export_student(best, out, onnx=False, torchscript=False)
    first = json.loads((out / "export_report.json").read_text())
    assert set(first["files"]) == {"config.json", "model.safetensors"} and "torch" in first["made_from"]["versions"]
    (tmp_path / ".model2.tmp999").mkdir()  # not this export's leftover: another folder's
    (out / "model.int8.onnx").write_bytes(b"a stray model serve --backend int8 would load")
    line = run_cli_error(["export", "--ckpt", str(best), "--out", str(out), "--no-onnx", "--no-torchscript"], capsys)
    assert "(its files changed since it was written, or were added or removed)" in line
    cli_main(["export", "--ckpt", str(best), "--out", str(out), "--no-onnx", "--no-torchscript", "--overwrite_stale"])
    assert not (out / "model.int8.onnx").exists() and (tmp_path / ".model2.tmp999").is_dir()
    cli_main(["export", "--ckpt", str(best), "--out", str(out), "--no-onnx", "--no-torchscript", "--overwrite_stale"])
    assert "is already the export of" in capsys.readouterr().out  # current: kept
    before = (out / "export_report.json").stat().st_mtime_ns
    cli_main(["export", "--ckpt", str(best), "--out", str(out), "--no-onnx", "--no-torchscript", "--overwrite"])
    assert (out / "export_report.json").stat().st_mtime_ns != before  # asked for: built again


def test_a_failed_fit_closes_its_tensorboard_writer_before_removing_its_folders(tmp_path):
    """The writer thread of TensorBoard flushes on its own: a folder removed under it made Lightning's next
    `logger.finalize("failed")` raise FileNotFoundError in place of the run's one-line error (seen under load)."""
    from types import SimpleNamespace

    from pytorch_lightning.loggers import TensorBoardLogger

    from distill.common.errors import UserError
    from distill.training.run_records import RemoveUnusedOutputs

    logger = TensorBoardLogger(tmp_path / "runs", name="run", default_hp_metric=False)
    unused = RemoveUnusedOutputs([tmp_path / "runs"])
    logger.experiment.add_text("note", "queued in the writer, not yet on disk")
    unused.on_exception(SimpleNamespace(loggers=[logger], is_global_zero=True), None, UserError("bad option"))
    logger.finalize("failed")  # what Lightning does next


def test_a_pipeline_with_a_mistaken_option_is_refused_before_any_stage_runs(tmp_path):
    from distill.commands.pipeline import run_pipeline
    with pytest.raises(UsageError, match=r"^pipeline: stage 'teacher': its distill fit options: .*--model.lrr 1; did "
                                         r"you mean 'model.lr'"):
        run_pipeline(ROOT / "configs" / "pipeline.yaml", ["--model.lrr", "1"], root=tmp_path / "runs")
    assert not any((tmp_path / "runs").rglob("*.ckpt")) and not any((tmp_path / "runs").rglob("stage.json"))


def test_runs_recorded_by_an_earlier_version_are_reused_when_their_checkpoint_says_the_same_options(tmp_path):
    import torch
    recipe = str(ROOT / "configs" / "distill.yaml")
    (run,) = plan_runs(recipe, ["none"], [0], tmp_path / "c", [])
    (run["folder"] / "checkpoints").mkdir(parents=True)
    made = {**run["options"], "seed_everything": 0, "model.distillation": "none"}
    torch.save({"run_options": made}, run["folder"] / "checkpoints" / "last.ckpt")  # as its fit recorded them
    (run["folder"] / "run.json").write_text(json.dumps({"options": {"model.lr": 0.001}}))  # an old record: no defaults
    check_same_options([run])  # reused, and its record brought up to date
    assert json.loads((run["folder"] / "run.json").read_text())["options"] == run["options"]
    torch.save({"run_options": {**made, "model.lr": 0.5}}, run["folder"] / "checkpoints" / "last.ckpt")
    (run["folder"] / "run.json").write_text(json.dumps({"options": {"model.lr": 0.5}}))
    with pytest.raises(UserError, match=r"was made earlier, but its options changed \(model.lr: 0.5 -> 0.001"):
        check_same_options([run])  # its checkpoint says otherwise: refused as before
    from distill.common.identity import as_recorded_now
    assert as_recorded_now({"trainer.devices": "2", "data.dataset": "sha256:12"}) == {"trainer.devices": 2,
                                                                                      "data.dataset": "sha256:12"}


def test_a_pipeline_stage_recorded_by_an_earlier_version_is_reused_when_its_checkpoint_agrees(tmp_path):
    import torch
    configs = copy_configs(tmp_path / "pipe")
    root = tmp_path / "runs"
    stage = {"name": "teacher", "config": str(configs / "teacher.yaml")}
    finished_stage(root, stage)
    identity = stage_identity(stage, root, [])
    torch.save({"run_options": identity["options"]}, root / "teacher" / "checkpoints" / "last.ckpt")
    (root / "teacher" / "stage.json").write_text(json.dumps({"options": {"model.lr": 0.001}, "from": {}}))
    _check_unchanged(stage, root, identity)
    assert json.loads((root / "teacher" / "stage.json").read_text()) == identity
    with pytest.raises(UserError, match=r"model.lr: .* -> 0.1"):
        _check_unchanged(stage, root, stage_identity(stage, root, ["--model.lr", "0.1"]))


def test_validate_of_a_runs_saved_config_leaves_its_result_file_and_writes_metrics_json_only_when_asked(tmp_path,
                                                                                                        capsys):
    result = tmp_path / "result.json"
    args = distill_args(tmp_path)
    cli_main([*args, f"--metrics_json={result}"])
    before = result.read_bytes()
    saved = next((tmp_path / "runs").rglob("config.yaml"))  # the run's config: it names its fit's result file
    assert str(result) in saved.read_text()
    checkpoint = f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"
    cli_main(["validate", "--config", str(saved), checkpoint, "--trainer.logger=false"])
    assert result.read_bytes() == before  # what fit wrote stays as it was
    measured = tmp_path / "measured.json"
    cli_main(["validate", "--config", str(saved), checkpoint, "--trainer.logger=false", f"--metrics_json={measured}"])
    figures = json.loads(measured.read_text())
    assert 0.0 <= figures["val/acc"] <= 1.0 and all(name.startswith("val/") for name in figures)
    assert result.read_bytes() == before
