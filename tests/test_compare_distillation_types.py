"""`distill compare`: the same student under none / soft / hard for several seeds, in one table."""
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import cli_main
from distill.commands.compare import format_table, plan_runs, summarize_runs
from distill.commands.speed_figure import speed_table, teacher_configs
from distill.common.errors import UsageError, UserError
from distill.training.cli import make_cli
from tests.helpers import ROOT, TINY_STUDENT, TINY_TEACHER, config_overrides, random_teacher_file, run_cli_error


def result(final: float, best: float, teacher: float = 0.99, wall: float = 10.0) -> dict:
    return {"final_metrics": {"val/acc": final}, "metrics": {"val/acc": best, "val/teacher_acc": teacher},
            "wall_time_s": wall}


def test_the_summary_is_mean_and_spread_over_seeds_with_gap_to_teacher_and_gain_over_none():
    runs = [{"type": "none", "seed": 0, "result": result(0.60, 0.62)}, {"type": "none", "seed": 1, "result": result(0.64, 0.66)},
            {"type": "hard", "seed": 0, "result": result(0.97, 0.98)}, {"type": "hard", "seed": 1, "result": result(0.99, 0.99)}]
    summary = summarize_runs(runs, ["none", "hard"])
    hard, none = summary["types"]["hard"], summary["types"]["none"]
    assert math.isclose(hard["final"]["mean"], 0.98) and math.isclose(hard["final"]["std"], math.sqrt(2) * 0.01)
    assert math.isclose(hard["best"]["mean"], 0.985)
    assert math.isclose(summary["teacher_acc"], 0.99)
    assert math.isclose(hard["gap_to_teacher"], 0.01) and math.isclose(hard["gain_over_none"], 0.36)
    assert none["gain_over_none"] == 0.0 and hard["seeds"] == [0, 1]
    table = format_table(summary)
    assert "98.00 +- 1.41" in table and "+36.00" in table and "teacher" in table.splitlines()[-1]


def test_a_student_level_with_its_teacher_up_to_rounding_shows_a_gap_of_plus_zero_not_minus_zero():
    runs = [{"type": "hard", "seed": 0, "result": result(0.9944445, 0.9944445, teacher=0.9944444)}]
    table = format_table(summarize_runs(runs, ["hard"]))
    assert "-0.00" not in table and "+0.00" in table.splitlines()[2]


def test_one_seed_shows_its_value_without_a_spread_and_identical_seeds_show_a_spread_of_zero():
    one = format_table(summarize_runs([{"type": "soft", "seed": 0, "result": result(0.95, 0.96)}], ["soft"]))
    assert " 95.00 " in one.splitlines()[2] and "+-" not in one
    same = [{"type": "soft", "seed": s, "result": result(0.95, 0.96)} for s in (0, 1)]
    assert "95.00 +- 0.00" in format_table(summarize_runs(same, ["soft"]))


def test_the_speed_table_has_each_students_type_the_ensemble_and_each_member_at_both_batch_sizes():
    runs = [{"type": "soft", "seed": s, "result": result(0.90 + s / 100, 0.95)} for s in (0, 1)]
    for run in runs:
        run["result"]["metrics"].update({"val/teacher_acc_0": 0.80, "val/teacher_acc_1": 0.85})
    summary = summarize_runs(runs, ["soft"])
    per_s = {"student": {"1": 900.0, "64": 2000.0}, "teacher": {"1": 300.0, "64": 600.0},
             "teacher 0": {"1": 600.0, "64": 1200.0}, "teacher 1": {"1": 600.0, "64": 1200.0}}
    lines = speed_table(summary, {"images_per_s": per_s, "threads": 1}).splitlines()
    assert lines[2].split() == ["student", "(soft)", "90.50", "+-", "0.71", "900", "2000"]
    assert lines[3].split() == ["teacher", "(ensemble", "of", "2)", "99.00", "300", "600"]
    assert [line.split()[:3] for line in lines[4:]] == [["teacher", "0", "80.00"], ["teacher", "1", "85.00"]]

    for seed, run in enumerate(runs):  # measured on a held-out folder too (--test): the figure's points are those
        run["held_out"] = {"val/acc": 0.80 + seed / 100, "val/teacher_acc": 0.88, "val/teacher_acc_0": 0.70,
                           "val/teacher_acc_1": 0.75}
    lines = speed_table(summarize_runs(runs, ["soft"]), {"images_per_s": per_s, "threads": 1}).splitlines()
    assert "top-1 (held-out)" in lines[0] and lines[2].split()[:5] == ["student", "(soft)", "80.50", "+-", "0.71"]
    assert lines[3].split()[4] == "88.00" and [line.split()[2] for line in lines[4:]] == ["70.00", "75.00"]


def test_the_figure_finds_the_teachers_a_checkpoint_records_one_or_an_ensembles_members():
    one = {"model_name": "resnet10t", "img_size": None}
    assert teacher_configs(None) == [] and teacher_configs(one) == [one]
    assert teacher_configs({"members": [one, {**one, "img_size": 48}]}) == [one, {**one, "img_size": 48}]


def tiny_compare(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """`distill compare` of the real config over a tiny student and a random teacher, 2 steps an epoch."""
    teacher = random_teacher_file(tmp_path, TINY_TEACHER, 10)
    return [sys.executable, "-m", "distill", "compare", "--config", str(ROOT / "configs" / "distill.yaml"),
            "--out", str(out), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher}",
            *[f"--model.student.init_args.{k}={v}" for k, v in TINY_STUDENT.items()], "--data.num_workers=0",
            "--data.batch_size=16", "--trainer.limit_train_batches=2", *extra]


def test_compare_trains_each_type_and_seed_prints_the_table_and_resumes_finished_runs(tmp_path, capsys):
    out = tmp_path / "compare"
    arm = tmp_path / "hard_class.yaml"  # an arm given as its method's class (with options, if it had any)
    arm.write_text("model:\n  distillation:\n    class_path: Hard\n")
    command = tiny_compare(tmp_path, out, "--types", f"none,{arm}", "--seeds", "2", "--jobs", "2",
                           "--trainer.max_epochs=1", "--trainer.limit_val_batches=2")
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 runs (none, hard_class x seeds 0..1), 2 at a time, 1 thread(s) each" in first.stdout
    record = json.loads((out / "compare.json").read_text())
    assert [(r["type"], r["seed"]) for r in record["runs"]] == [("none", 0), ("hard_class", 0), ("none", 1), ("hard_class", 1)]
    for run in record["runs"]:
        assert run["result"]["steps"] == 2 and 0.0 <= run["result"]["final_metrics"]["val/acc"] <= 1.0
        assert (out / run["type"] / f"seed_{run['seed']}" / "checkpoints" / "best.ckpt").is_file()
    assert record["summary"]["types"]["hard_class"]["runs"] == 2
    table = (out / "compare.md").read_text()
    assert "gain over none" in table and "hard_class" in table and "teacher" in table

    capsys.readouterr()
    cli_main(command[3:])  # again, in this process: nothing left to train
    assert "4 of 4 runs finished earlier, skipped" in capsys.readouterr().out
    record = json.loads((out / "compare.json").read_text())
    assert record["speed"] is None and not (out / "accuracy_vs_speed.png").exists()

    cli_main([*command[3:], "--plot"])  # DeiT's Figure 1 of the finished runs: nothing trained again
    printed = capsys.readouterr().out
    assert "4 of 4 runs finished earlier, skipped" in printed and "images/s, batch 64" in printed
    assert (out / "accuracy_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "compare.json").read_text())
    speed = record["speed"]["images_per_s"]
    assert set(speed) == {"student", "teacher"} and all(v > 0 for by_batch in speed.values() for v in by_batch.values())
    assert set(speed["student"]) == {"1", "64"} and "student (hard_class)" in printed.split("images/s, batch 64")[1]
    assert "images/s, batch 1" in (out / "compare.md").read_text()
    assert "--plot" in (out / "compare.md").read_text().splitlines()[0]  # the command that draws it again

    line = run_cli_error([*command[3:], "--model.lr=0.1"], capsys)
    assert "was made earlier, but its options changed (model.lr: 0.001 -> 0.1, as then -> now)" in line
    assert json.loads((out / "compare.json").read_text()) == record  # the earlier table is not relabelled


@pytest.mark.parametrize("args, message", [
    (["--types", "none,medium"], "compare --types: 'medium' is neither a method (none, soft, hard, dkd, dist"),
    (["--jobs", "0"], "compare --jobs: expected auto or a number of 1 or more, got 0"),
    (["--types", "none,none"], "compare --types: none,none names a type twice"),
    (["--first_seed", "-1"], "distill compare: --first_seed: -1 is out of range (accepted: >= 0)"),
    (["--model.distillation=soft"], "--model.distillation is set by compare for each run; leave it out"),
    (["--types", "none,soft", "--model.teacher.init_args.weights=nope.ckpt"],
     "compare: model.teacher: weights 'nope.ckpt' does not exist"),
    (["--types", "soft,dkd", "--model.distillation.standardize", "true"],
     "compare: --model.distillation.standardize: a method's own options go in an arm file, given to --types"),
])
def test_compare_mistakes_are_one_line(tmp_path, capsys, args, message):
    line = run_cli_error(["compare", "--config", str(ROOT / "configs" / "distill.yaml"), "--out", str(tmp_path / "c"),
                          *args], capsys)
    assert message in line and not (tmp_path / "c").exists()


def test_a_teachers_missing_weights_are_named_before_any_run_and_only_arms_with_a_teacher_need_them(tmp_path,
                                                                                                      monkeypatch):
    from distill.common.checkpoints import check_teacher_weights

    monkeypatch.chdir(tmp_path)  # the overlay's members are runs/teacher_seed0..2 here: none exists
    recipe, ensemble = (str(ROOT / "configs" / name) for name in ("distill.yaml", "teachers/ensemble.yaml"))
    arm = tmp_path / "dkd_beta2.yaml"
    arm.write_text("model:\n  distillation:\n    class_path: DKD\n    init_args: {beta: 2.0}\n")
    none, soft, dkd = plan_runs([recipe, ensemble], ["none", "soft", str(arm)], [0], tmp_path / "c", [])
    assert (none["needs_teacher"], soft["needs_teacher"], dkd["needs_teacher"]) == (False, True, True)
    with pytest.raises(UserError, match=re.escape("model.teacher (member 1 of 3): weights "
                                                  "'runs/teacher_seed0/checkpoints/best.ckpt' does not exist")):
        check_teacher_weights(soft["options"], "compare")
    for seed in (0, 1):  # the first two members trained (only their existence is checked here): the third is named
        (tmp_path / "runs" / f"teacher_seed{seed}" / "checkpoints").mkdir(parents=True)
        random_teacher_file(tmp_path / "runs" / f"teacher_seed{seed}" / "checkpoints", name="best.ckpt")
    (soft,) = plan_runs([recipe, ensemble], ["soft"], [0], tmp_path / "c", [])
    with pytest.raises(UserError, match=re.escape("member 3 of 3): weights 'runs/teacher_seed2/")):
        check_teacher_weights(soft["options"], "compare")
    with pytest.raises(UserError, match="member 3 of 3"):  # a run from a cache builds its teacher too (to verify it)
        check_teacher_weights({**soft["options"], "data.teacher_cache": "cache"}, "compare")


def test_sigterm_to_compare_stops_its_runs_and_they_save_their_checkpoints(tmp_path):
    import signal
    import time

    out = tmp_path / "compare"
    command = tiny_compare(tmp_path, out, "--types", "none", "--seeds", "1", "--jobs", "1", "--trainer.max_epochs=500",
                           "--trainer.limit_val_batches=1")
    compare = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "none" / "seed_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and compare.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    compare.send_signal(signal.SIGTERM)  # preempted
    assert compare.wait(timeout=120) == 143
    log = (out / "none" / "seed_0" / "fit.log").read_text()
    assert "stopped by SIGTERM; resume with the same command" in log  # the run was stopped, not orphaned


def test_an_overlay_config_is_passed_in_order_and_cannot_move_a_runs_outputs(tmp_path):
    overlay = str(ROOT / "configs" / "students" / "deit.yaml")  # it sets checkpoint.dirpath and the logger
    recipe = str(ROOT / "configs" / "distill.yaml")
    (run,) = plan_runs([recipe, overlay], ["hard"], [3], tmp_path, ["--data.img_size=32"])
    command = run["command"]
    configs = [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]
    assert configs == [recipe, overlay]
    dirpath = f"--checkpoint.dirpath={tmp_path / 'hard' / 'seed_3' / 'checkpoints'}"
    assert command.index("--data.img_size=32") < command.index(dirpath)
    assert command.index(overlay) < command.index("--seed_everything=3")  # compare's own options come last


def test_the_none_arm_has_no_teacher_at_all_even_when_the_options_imitate_features(tmp_path, caplog):
    recipe = str(ROOT / "configs" / "distill.yaml")
    none, soft = plan_runs(recipe, ["none", "soft"], [0], tmp_path, ["--model.feature_weight=2.5"])
    assert "--model.distillation=none" in none["command"] and "--model.distillation=soft" in soft["command"]
    args = [*config_overrides(ROOT / "configs" / "distill.yaml", tmp_path), "--model.feature_weight=2.5",
            "--model.distillation=none"]
    with caplog.at_level(logging.INFO, logger="distill"):
        module = make_cli(args, run=False).model  # `none` itself drops the teacher and its features: no patch needed
    assert module.teacher is None and module.imitation is None and module.loss.feature_weight == 0.0
    assert "model.distillation none: no teacher runs" in caplog.text


def test_an_arm_given_as_a_file_runs_its_method_class_with_its_options_named_by_the_file(tmp_path):
    recipe = str(ROOT / "configs" / "distill.yaml")
    arm = tmp_path / "dkd_beta2.yaml"
    arm.write_text("model:\n  distillation:\n    class_path: DKD\n    init_args: {beta: 2.0}\n")
    soft, dkd = plan_runs(recipe, ["soft", str(arm)], [0], tmp_path / "c", [])
    assert (soft["type"], dkd["type"]) == ("soft", "dkd_beta2")
    assert dkd["folder"] == tmp_path / "c" / "dkd_beta2" / "seed_0"
    assert str(arm) in dkd["command"] and not any(a.startswith("--model.distillation") for a in dkd["command"])
    assert dkd["arm"]["model.distillation.class_path"].endswith(".DKD")
    assert dkd["arm"]["model.distillation.init_args.beta"] == 2.0  # the file's option; the others DKD's defaults
    assert soft["arm"] is None and soft["options"] == dkd["options"]  # the same recipe, another method


def test_the_baseline_file_is_an_arm_at_its_own_augmentation_and_the_gains_are_measured_from_it(tmp_path,
                                                                                                  monkeypatch):
    recipe, baseline = (str(ROOT / "configs" / name) for name in ("distill.yaml", "baselines/no_teacher.yaml"))
    alone, soft = plan_runs(recipe, [baseline, "soft"], [0], tmp_path / "c", [])
    assert (alone["type"], alone["needs_teacher"], soft["needs_teacher"]) == ("no_teacher", False, True)
    assert alone["arm"]["data.mixup"] == 0.0 and alone["arm"]["data.auto_augment"] is None  # the file's augmentation
    assert soft["options"]["data.mixup"] == 0.8 and soft["arm"] is None  # the others keep the recipe's
    dirpath = next(a for a in alone["command"] if a.startswith("--checkpoint.dirpath="))  # the file sets one too
    assert alone["command"].index(baseline) < alone["command"].index(dirpath) and "no_teacher/seed_0" in dirpath
    runs = [{**alone, "result": result(0.90, 0.91)}, {**soft, "result": result(0.95, 0.96)}]
    summary = summarize_runs(runs, ["no_teacher", "soft"])
    assert summary["baseline"] == "no_teacher" and math.isclose(summary["types"]["soft"]["gain_over_none"], 0.05)
    assert "gain over no_teacher" in format_table(summary)

    import distill.commands.speed_figure as speed_figure
    measured = []  # DeiT's Figure 1 takes its teachers from a run that had them, not from the baseline's
    monkeypatch.setattr(speed_figure, "comparison_models", lambda checkpoint: measured.append(checkpoint) or {})
    monkeypatch.setattr(speed_figure, "measure_throughput", lambda models, batches, threads: {})
    speed_figure.measure_comparison(runs, threads=1)
    assert measured == [soft["folder"] / "checkpoints" / "best.ckpt"]


def test_a_comparison_without_a_teacher_does_not_need_the_teachers_weights(tmp_path, monkeypatch):
    import distill.commands.compare as compare

    class Reached(Exception):
        pass

    def run_all(runs, *args):
        raise Reached([run["type"] for run in runs])
    monkeypatch.setattr(compare, "run_all", run_all)
    monkeypatch.chdir(tmp_path)
    recipe, baseline = (str(ROOT / "configs" / name) for name in ("distill.yaml", "baselines/no_teacher.yaml"))
    for index, types in enumerate(("none", baseline)):  # the recipe's teacher file does not exist here: none needs it
        with pytest.raises(Reached):
            compare.main(["--config", recipe, "--types", types, "--seeds", "1", "--out", str(tmp_path / f"a{index}")])
    with pytest.raises(UserError, match="model.teacher: weights 'runs/teacher/checkpoints/best.ckpt' does not exist"):
        compare.main(["--config", recipe, "--types", "none,soft", "--seeds", "1", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("content, message", [
    ("model:\n  distillation: DKD\n  lr: 0.01\n", "sets model.lr besides model.distillation"),
    ("model:\n  distillation:\n    class_path: DKD\n    init_args: {beta: -1}\n",
     "model.distillation.init_args.beta: -1 is out of range"),
    (None, "dkd_beta2.yaml' does not exist (an arm's file: it sets model.distillation)"),
    ("model:\n  distillation: DKD\ndata:\n  mixup: 0.0\n", "sets data.mixup besides model.distillation"),
    ("model:\n  distillation: none\ndata:\n  img_size: 48\n", "sets data.img_size besides model.distillation and"),
    ("model:\n  distillation: none\ndata:\n  crop_pct: 0.5\n", "sets data.crop_pct besides"),  # validation views
])
def test_an_arm_file_that_changes_more_than_the_method_or_is_wrong_is_refused(tmp_path, content, message):
    arm = tmp_path / "dkd_beta2.yaml"
    if content is not None:
        arm.write_text(content)
    with pytest.raises((UserError, UsageError), match=re.escape(message)):
        plan_runs(str(ROOT / "configs" / "distill.yaml"), ["soft", str(arm)], [0], tmp_path / "c", [])
    assert not (tmp_path / "c").exists()


def test_a_run_without_a_teacher_is_resumed_after_the_teacher_is_trained_a_run_with_one_is_not(tmp_path):
    from distill.commands.compare import check_same_options

    recipe, teacher = str(ROOT / "configs" / "distill.yaml"), tmp_path / "teacher.safetensors"
    args = [f"--model.teacher.init_args.weights={teacher}"]
    none, soft = plan_runs(recipe, ["none", "soft"], [0], tmp_path / "c", args)  # no teacher yet: a path
    for run in (none, soft):  # both interrupted; what each fit recorded in its checkpoint, as compare expects it
        (run["folder"] / "checkpoints").mkdir(parents=True)
        options = {**run["options"], "model.distillation": run["type"], "seed_everything": 0}
        torch.save({"run_options": options}, run["folder"] / "checkpoints" / "last.ckpt")
        (run["folder"] / "run.json").write_text(json.dumps({"options": run["options"]}))
    random_teacher_file(tmp_path, name=teacher.name)  # the teacher, trained since: its weights by content now
    none, soft = plan_runs(recipe, ["none", "soft"], [0], tmp_path / "c", args)
    check_same_options([none])  # resumed, and its record brought up to date
    assert json.loads((none["folder"] / "run.json").read_text())["options"] == none["options"]
    with pytest.raises(UserError, match=re.escape("its options changed (model.teacher.init_args.weights: ")):
        check_same_options([soft])  # a run distilled from another teacher is not this comparison's


def test_an_arm_file_edited_after_its_runs_is_refused_naming_the_option(tmp_path):
    from distill.commands.compare import check_same_options

    recipe, arm = str(ROOT / "configs" / "distill.yaml"), tmp_path / "dkd_tuned.yaml"
    arm.write_text("model:\n  distillation:\n    class_path: DKD\n    init_args: {beta: 2.0}\n")
    (run,) = plan_runs(recipe, [str(arm)], [0], tmp_path / "c", [])
    (run["folder"] / "checkpoints").mkdir(parents=True)
    (run["folder"] / "checkpoints" / "last.ckpt").write_bytes(b"an interrupted run")
    (run["folder"] / "run.json").write_text(json.dumps({"options": run["options"], "arm": run["arm"]}))
    check_same_options([run])  # the same file: resumed
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "DKD_Tuned.yaml").write_text(arm.read_text())
    with pytest.raises(UserError, match="type twice"):  # one folder on a case-insensitive filesystem
        plan_runs(recipe, [str(arm), str(tmp_path / "other" / "DKD_Tuned.yaml")], [0], tmp_path / "c", [])
    (tmp_path / "other" / "None.yaml").write_text(arm.read_text())
    with pytest.raises(UserError, match="'None' is taken by the method none"):  # not the baseline
        plan_runs(recipe, ["soft", str(tmp_path / "other" / "None.yaml")], [0], tmp_path / "c", [])
    arm.write_text(arm.read_text().replace("2.0", "3.0"))
    with pytest.raises(UserError, match=r"model.distillation.init_args.beta: 2.0 -> 3.0"):
        check_same_options(plan_runs(recipe, [str(arm)], [0], tmp_path / "c", []))


def test_each_run_gets_the_cores_divided_and_never_more_threads_than_omp_num_threads_asks(monkeypatch):
    import os

    import torch

    from distill.commands.compare import _parallelism

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _parallelism("2", 10) == (2, 4, 0)  # (runs at once, threads each, GPUs)
    assert _parallelism("auto", 3) == (3, 2, 0)  # no more runs at once than runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a shared machine's cap
    assert _parallelism("2", 10) == (2, 1, 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert _parallelism("2", 10) == (2, 4, 0)  # never more than the cores divided


@pytest.mark.parametrize("arm", sorted((ROOT / "configs" / "methods").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_method_file_is_an_arm_of_compare_and_a_fit_overlay_of_the_recipe(arm, tmp_path):
    from distill.training.methods.base import LogitMethod

    recipe = str(ROOT / "configs" / "distill.yaml")
    soft, own = plan_runs(recipe, ["soft", str(arm)], [0], tmp_path / "c", [])
    assert own["type"] == arm.stem and own["needs_teacher"]  # the arm is named by its file, beside the recipe's soft
    base = config_overrides(ROOT / "configs" / "distill.yaml", tmp_path)
    cli = make_cli([*base[:2], "--config", str(arm), *base[2:]], run=False)  # as its comment says a user types it
    chosen = yaml.safe_load(arm.read_text())["model"]["distillation"]
    method = cli.model.loss.method
    assert isinstance(method, LogitMethod) and type(method).__name__ == chosen["class_path"].rsplit(".", 1)[-1]
    assert all(getattr(method, key) == value for key, value in chosen["init_args"].items())


def test_compare_test_measures_each_final_checkpoint_and_its_teacher_on_a_held_out_folder_once(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    held_out = tmp_path / "held_out"  # val/<class>/ alone (scans of the bundled set: the mechanics, not the figures)
    for label in range(10):
        (held_out / "val" / str(label)).mkdir(parents=True)
        for i in [int(i) for i in (digits.target == label).nonzero()[0][-2:]]:
            Image.fromarray((digits.images[i] * 15).astype("uint8")).save(held_out / "val" / str(label) / f"{i}.png")
    out = tmp_path / "compare"
    command = tiny_compare(tmp_path, out, "--types", "soft", "--seeds", "1", "--jobs", "1",
                           "--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--test", str(held_out))[3:]
    cli_main(command)
    assert "[compare] soft seed 0: held-out top-1" in capsys.readouterr().out
    header, _, soft, teacher = [line.split("  ") for line in (out / "compare.md").read_text().split("```")[1].strip()
                                .splitlines()[:4]]
    record = json.loads((out / "soft" / "seed_0" / "held_out.json").read_text())
    held = record["metrics"]
    assert "held-out top-1" in [cell.strip() for cell in header if cell.strip()]
    assert f"{100 * held['val/acc']:.2f}" in [cell.strip() for cell in soft]  # the run's final checkpoint
    assert f"{100 * held['val/teacher_acc']:.2f}" in [cell.strip() for cell in teacher]  # its teacher, same images
    assert "held-out: each run's final checkpoint and its teacher(s) on" in (out / "compare.md").read_text()

    cli_main(command)  # again: nothing trained, nothing measured again
    assert "held-out top-1 " not in capsys.readouterr().out.split("distillation ")[0]
    image = next((held_out / "val" / "3").iterdir())
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)  # the images changed
    cli_main(command)
    assert "[compare] soft seed 0: held-out top-1" in capsys.readouterr().out  # measured again
    assert json.loads((out / "soft" / "seed_0" / "held_out.json").read_text())["made_from"] != record["made_from"]

    (out / "soft" / "seed_0" / "held_out.json").write_text('{"made_from": ' + json.dumps(record["made_from"]) + '}')
    cli_main(command)  # a record without its figures (damaged) is measured again, not read
    assert "[compare] soft seed 0: held-out top-1" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda tmp, data: "", "compare --test: '' is empty; give a folder of held-out images as val/<class>/*"),
    (lambda tmp, data: str(tmp / "nowhere"), "nowhere' does not exist; give a folder of held-out images"),
    (lambda tmp, data: str(data / "val" / "rose" / "img_0.jpg"), "img_0.jpg' is a file, not a folder"),
    (lambda tmp, data: str(data), "is the runs' own data.dataset; give images they were not trained or validated on"),
    (lambda tmp, data: str(_held_out_copy(data, tmp, rename=("rose", "poppy"))),
     "holds other class folders than the runs' data (5 against 5; e.g. ['poppy', 'rose'])"),
    (lambda tmp, data: str(_held_out_copy(data, tmp, empty="iris")), "compare --test: class folder"),
])
def test_a_held_out_folder_compare_cannot_measure_is_refused_before_any_run(tmp_path, capsys, make, message):
    from distill.commands.held_out import check_held_out
    from tests.test_own_data_start_to_finish import own_images

    data = own_images(tmp_path / "flowers", ("daisy", "rose", "tulip", "iris", "lily"), seed=1)
    line = run_cli_error(["compare", "--config", str(ROOT / "configs" / "distill.yaml"), "--types", "soft", "--seeds",
                          "1", "--out", str(tmp_path / "c"), "--data.dataset", str(data), "--test",
                          make(tmp_path, data)], capsys)
    assert message in line and not (tmp_path / "c").exists()  # refused before any run folder is made
    (run,) = plan_runs(str(ROOT / "configs" / "distill.yaml"), ["soft"], [0], tmp_path / "c", ["--data.dataset", str(data)])
    assert check_held_out(str(_held_out_copy(data, tmp_path / "ok")), run) == tmp_path / "ok" / "held_out"


def _held_out_copy(data: Path, tmp: Path, rename: tuple[str, str] | None = None, empty: str | None = None) -> Path:
    import shutil

    copy = tmp / "held_out"
    shutil.copytree(data / "val", copy / "val")
    if rename:
        (copy / "val" / rename[0]).rename(copy / "val" / rename[1])
    if empty:
        for image in (copy / "val" / empty).iterdir():
            image.unlink()
    return copy
