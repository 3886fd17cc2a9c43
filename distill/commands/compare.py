"""`distill compare`: what the teacher adds, and how far the student stays from it.

    distill compare --config configs/distill.yaml --seeds 5 [--types none,soft,hard] [--jobs auto]
                    [--out runs/compare] [any fit option for every run, e.g. --data.dataset /my/data]

Trains the config's student once per (distillation type, seed), each a `distill fit` process
writing under `OUT/<type>/seed_<s>/` (TensorBoard logs, checkpoints, `result.json`), `--jobs`
at a time, then prints mean +- standard deviation over the seeds of the averaged head's top-1
on the validation split at the final epoch (and at the best epoch: choosing the epoch on the
split it is measured on flatters it), the gap to the teacher (its accuracy on the same split)
and the gain over `none` (the same student, recipe and budget without the teacher, so without feature
imitation either; or over an arm file without a teacher at its own augmentation: `--types
configs/baselines/no_teacher.yaml,soft`). With `--test DIR` (a held-out folder, `DIR/val/<class>/`) each run's
final checkpoint and its teacher(s) are measured on images no run trained on nor chose its best epoch on, a column
of the table (distill/commands/held_out.py). The table
and every run's figures are also written to `OUT/compare.md` and `OUT/compare.json`.

Running the command again skips finished runs and resumes interrupted ones (as the pipeline
does), only with the same options (each run folder records them in `run.json`; other options
into the same OUT are refused); a second `compare` writing into the same OUT at once is refused. On a CPU machine the
runs go in parallel, one per core, each on one thread (on this project's 2-core CPU two
1-thread runs do more work than one 2-thread run: docs/speed.md); on a GPU machine one run per GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from distill.commands.arms import arm_of, is_method_option, method_of
from distill.commands.compare_table import format_table, summarize_runs
from distill.commands.held_out import check_held_out, measure_held_out
from distill.commands.speed_figure import draw, measure_comparison, speed_table
from distill.common.argv import given, pairs
from distill.common.commandline import command
from distill.common.errors import UserError
from distill.common.files import OutputLock, write_atomically
from distill.common.processes import Children, stop_on_sigterm
from distill.common.checkpoints import check_teacher_weights, recorded_run_options
from distill.common.names import same_folder
from distill.common.identity import as_recorded_now, finished, options_change, read_record, trained_something
from distill.common.ranges import NonNegativeInt, PositiveInt
from distill.training.cli import fit_options
from distill.training.methods import method_names, needs_teacher

__all__ = ["plan_runs", "summarize_runs", "format_table", "main"]

# what compare sets for each run itself
RESERVED = ("--seed_everything", "--model.distillation", "--metrics_json", "--checkpoint.dirpath", "--ckpt_path")


def plan_runs(config: str | list[str], types: list[str], seeds: list[int], out: Path,
              extra: list[str]) -> list[dict[str, Any]]:
    """One `distill fit` command per (type, seed), in the order they run (seed-major: a partial table is balanced).

    `config`: one fit config, or several (a recipe, then overlays such as configs/students/deit.yaml), in order.
    `types`: method names, or YAML files that set `model.distillation` alone (a class with its options; the arm is
    named by the file's stem).
    """
    configs = [config] if isinstance(config, str) else list(config)
    given_configs = [a for c in configs for a in ("--config", c)]
    # what each run is made from, as its fit records it (by content: config files, and any file an option names)
    options = fit_options([*given_configs, *extra], "compare")
    arms = {kind: arm_of(kind, given_configs, extra, options) for kind in types}
    named = [arm[0] for arm in arms.values()]
    if len(named) != len(types) or any(same_folder(a, b) for i, a in enumerate(named) for b in named[:i]):
        raise UserError(f"compare --types: {','.join(types)} names a type twice")  # (one folder, in any case)
    runs = []
    for seed in seeds:
        for kind in types:
            name, method_args, arm = arms[kind]
            folder = out / name / f"seed_{seed}"
            # compare's own options last: nothing in `extra` may move a run's outputs, seed or type
            command = [sys.executable, "-m", "distill", "fit", *given_configs, *extra, f"--seed_everything={seed}",
                       *method_args,  # `none`: no teacher at all, nor its features
                       f"--trainer.logger.init_args.save_dir={out}",
                       f"--trainer.logger.init_args.name={name}/seed_{seed}",
                       f"--checkpoint.dirpath={folder / 'checkpoints'}", f"--metrics_json={folder / 'result.json'}",
                       "--trainer.enable_progress_bar=false"]
            if (folder / "checkpoints" / "last.ckpt").is_file():
                command.append(f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}")
            runs.append({"type": name, "seed": seed, "folder": folder, "command": command, "options": options,
                         "fit_args": [*given_configs, *extra, f"--seed_everything={seed}", *method_args],  # no outputs
                         "arm": arm, "needs_teacher": needs_teacher(method_of(kind, arm))})
    return runs


def check_same_options(runs: list[dict[str, Any]]) -> None:
    """A run folder is reused (skipped or resumed) only if it was made from the options it would be made from now
    (its run.json: the merged options by content, not the paths or command line that named them); a folder in which
    nothing was trained (a run that failed on a bad option) is started again."""
    for run in runs:
        record = run["folder"] / "run.json"
        if not run["folder"].exists():
            continue
        if not record.is_file():
            raise UserError(f"compare --out: '{run['folder']}' exists but was not written by compare (no run.json); "
                            "choose another --out")
        if not trained_something(run["folder"]):
            continue
        recorded = read_record(record) or {}
        before = as_recorded_now(recorded.get("options"))
        if before == run["options"] and as_recorded_now(recorded.get("arm")) == run["arm"]:
            continue
        made = as_recorded_now(recorded_run_options(run["folder"]))  # what its fit recorded (read only when needed)
        expected = {**{k: v for k, v in run["options"].items() if not is_method_option(k)},
                    **(run["arm"] or {"model.distillation": run["type"]}), "seed_everything": run["seed"]}
        if _made_from(made, run) == _made_from(expected, run):  # a record of an earlier version (without the
            # defaults), or a run without a teacher whose teacher was trained since: brought up to date
            with write_atomically(record) as partial:
                partial.write_text(json.dumps(_record(run, recorded), indent=2))
        else:
            change = (options_change(made, expected, "checkpoint") if isinstance(made, dict)  # what it trained with
                      else options_change({**(before or {}), **(as_recorded_now(recorded.get("arm")) or {})},
                                          {**run["options"], **(run["arm"] or {})}, "run.json"))
            raise UserError(f"compare --out: '{run['folder']}' was made earlier, but {change}; its result would not be "
                            "this comparison's: choose another --out, or repeat the same options to resume it")


def _made_from(options: Any, run: dict[str, Any]) -> Any:
    """What a run is made from, of the `options` it records: a run without a teacher is not made from the teacher's
    options (a comparison started before its teacher was trained resumes its `none` runs after)."""
    if run.get("needs_teacher", True) or not isinstance(options, dict):
        return options
    return {k: v for k, v in options.items() if k != "model.teacher" and not k.startswith("model.teacher.")}


def _record(run: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """A run's run.json: what it is made from (the shared options; an arm's method options, for a method given by
    a file), beside what else was `recorded` (its command)."""
    return {**recorded, "options": run["options"], **({"arm": run["arm"]} if run["arm"] is not None else {})}


def check_table_replaceable(out: Path, made_from: dict[str, Any], overwrite: bool) -> None:
    """compare.md / compare.json are replaced only by the same comparison (the same options, at least its runs) or
    with --overwrite: a comparison of other types or seeds into the same --out does not relabel an earlier table."""
    try:
        before = json.loads((out / "compare.json").read_text()).get("made_from")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        before = None
    try:
        counted = {(str(kind), int(seed)) for kind, seed in before["runs"]} if isinstance(before, dict) else None
    except (KeyError, TypeError, ValueError):  # a compare.json edited by hand: another table
        counted = None
    # a table of an earlier version records its options without the defaults: its runs' records, checked and brought
    # up to date by check_same_options, then say whether it is this comparison's
    same = counted is not None and (before.get("options") == made_from["options"] or all(
        (read_record(out / kind / f"seed_{seed}" / "run.json") or {}).get("options") == made_from["options"]
        for kind, seed in counted))
    if overwrite or (same and counted <= {(kind, seed) for kind, seed in made_from["runs"]}):
        return
    shown = f" ({', '.join(sorted({r[0] for r in counted}))} x {len({r[1] for r in counted})} seed(s))" if counted else ""
    raise UserError(f"compare --out: '{out / 'compare.md'}' holds the table of another comparison{shown}; choose "
                    "another --out, or pass --overwrite to replace that table (the runs it counted are kept)")


def run_all(runs: list[dict[str, Any]], jobs: int, threads: int, gpus: int, children: Children) -> list[dict[str, Any]]:
    """Run the unfinished runs, `jobs` at a time, as `children`; returns the results of every finished run."""
    todo = [run for run in runs if finished(run["folder"] / "result.json") is None]
    done = len(runs) - len(todo)
    if done:
        print(f"[compare] {done} of {len(runs)} runs finished earlier, skipped", flush=True)
    active: dict[int, tuple[dict[str, Any], subprocess.Popen, float, Any]] = {}
    failed = []
    slots = list(range(jobs))
    try:
        while todo or active:
            while todo and slots:
                run, slot = todo.pop(0), slots.pop(0)
                run["folder"].mkdir(parents=True, exist_ok=True)
                with write_atomically(run["folder"] / "run.json") as partial:  # a kill never leaves half of it
                    partial.write_text(json.dumps(_record(run, {"command": run["command"]}), indent=2))
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                log = open(run["folder"] / "fit.log", "a")
                process = children.start(run["command"], stdout=log, stderr=subprocess.STDOUT, env=env)
                active[slot] = (run, process, time.monotonic(), log)
                print(f"[compare] {run['type']} seed {run['seed']}: started (log: {run['folder'] / 'fit.log'})", flush=True)
            time.sleep(0.5)
            for slot, (run, process, started, log) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[slot]
                slots.append(slot)
                done += 1
                result = finished(run["folder"] / "result.json")
                if process.returncode != 0 or result is None:
                    failed.append(run)
                    print(f"[compare] {run['type']} seed {run['seed']}: FAILED (exit {process.returncode}); see "
                          f"{run['folder'] / 'fit.log'}", flush=True)
                    continue
                final = result.get("final_metrics", {}).get("val/acc")
                print(f"[compare] {run['type']} seed {run['seed']}: final top-1 {_pct(final)} in "
                      f"{time.monotonic() - started:.0f} s ({done}/{len(runs)})", flush=True)
    finally:  # Ctrl+C or SIGTERM: `children` stops the runs (each saves its last.ckpt); the next call resumes them
        for _, _, _, log in active.values():
            log.close()
    if failed:
        names = ", ".join(f"{run['type']} seed {run['seed']}" for run in failed)
        raise UserError(f"compare: {len(failed)} run(s) failed ({names}); their errors are at the end of their fit.log: "
                        "fix the cause and run the same command again (finished runs are kept)")
    return [{**run, "result": finished(run["folder"] / "result.json")} for run in runs]


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _parallelism(jobs: str, count: int) -> tuple[int, int, int]:
    """(parallel runs, threads per run, GPUs to spread them over)."""
    gpus = torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jobs == "auto":
        parallel = gpus or cores
    else:
        try:
            parallel = int(jobs)
        except ValueError:
            raise UserError(f"compare --jobs: expected auto or a number of 1 or more, got '{jobs}'") from None
        if parallel < 1:
            raise UserError(f"compare --jobs: expected auto or a number of 1 or more, got {parallel}")
    parallel = max(1, min(parallel, count))
    threads = max(1, cores // parallel)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) > 0:  # the user's own cap (a shared machine): never more than it
        threads = min(threads, int(asked))
    return parallel, threads, gpus


def compare(config: list[str], seeds: PositiveInt = 5, first_seed: NonNegativeInt = 0, types: str = "none,soft,hard",
            jobs: str = "auto", out: str = "runs/compare", overwrite: bool = False, plot: bool = False,
            test: Optional[str] = None, extra: Optional[list[str]] = None) -> None:
    """Train the config's student under each distillation type for several seeds, and print the table.

    Args:
        config: the fit config of the student and its teacher; again for an overlay, applied in order
            (--config configs/distill.yaml --config configs/students/deit.yaml)
        seeds: seeds per distillation type (0, 1, ...)
        first_seed: the first seed
        types: distillation methods to compare, comma-separated: by name ({methods}: distill/training/methods/),
            or as a YAML file that sets model.distillation to a method's class with its options (the arm is named
            by the file's stem: dkd_beta2.yaml -> dkd_beta2); a file whose method is none may also set the training
            views' options, and the gains are measured from it (configs/baselines/no_teacher.yaml: the student
            alone at the augmentation it learns from)
        jobs: runs at once: auto (one per GPU, else one per CPU core) or N; each run gets the cores divided
            among them, at most OMP_NUM_THREADS threads where that is set
        out: output folder (re-running resumes it)
        overwrite: replace OUT/compare.md and compare.json written by another comparison (other types, seeds or
            options); finished runs are never replaced
        plot: also measure the inference throughput of the student and the teacher(s) (ONNX Runtime on this
            machine's CPU, batch 1 and 64, side by side, one thread) and draw OUT/accuracy_vs_speed.png: top-1
            (held-out with --test) against images/s, DeiT's Figure 1 (docs/recipes.md)
        test: a held-out folder (val/<class>/*: images no run trained on nor chose its best epoch on): each run's
            final checkpoint and its teacher(s) are measured on it, a column of the table (kept in each run's
            held_out.json, measured again when the checkpoint or the images change)
        extra: options for each run's distill fit (--data.dataset, --trainer.max_epochs)
    """
    extra = list(extra or [])
    command_line = " ".join(["distill compare", *(f"--config {c}" for c in config), f"--seeds {seeds}",
                             *([f"--first_seed {first_seed}"] if first_seed else []), f"--types {types}",
                             f"--jobs {jobs}", f"--out {out}", *(["--plot"] if plot else []),
                             *([f"--test {test}"] if test is not None else []), *extra])
    names = [t.strip() for t in types.split(",") if t.strip()]
    if not names:
        raise UserError(f"compare --types: none given; give methods ({', '.join(method_names())}) or YAML files")
    for name in config:
        if not Path(name).is_file():
            raise UserError(f"compare --config: '{name}' does not exist")
    reserved = [name for name in RESERVED if given(extra, name)]
    if reserved:
        raise UserError(f"compare: {reserved[0]} is set by compare for each run; leave it out")
    method_options = pairs(extra, "--model.distillation.")
    if method_options:  # each arm's method is compare's to set: a method's own options live in an arm file
        option = method_options[0][0][len("--model.distillation."):].removeprefix("init_args.")
        example = "OPTION" if option == "class_path" else option  # the class is the arm's, the file names it
        raise UserError(f"compare: {method_options[0][0]}: a method's own options go in an arm file, given to --types "
                        f"(e.g. FILE.yaml holding `model: {{distillation: {{class_path: CLASS, init_args: "
                        f"{{{example}: VALUE}}}}}}`; the arm is named by the file)")
    out = Path(out)
    seeds = list(range(first_seed, first_seed + seeds))
    runs = plan_runs(config, names, seeds, out, extra)
    held_out = check_held_out(test, runs[0]) if test is not None else None
    types = list(dict.fromkeys(run["type"] for run in runs))  # the arms' names: a method's, a file's stem
    jobs, threads, gpus = _parallelism(jobs, len(runs))
    # a teacher's missing weights fail each run that builds it: named now, before any run folder is made
    if any(run["needs_teacher"] and finished(run["folder"] / "result.json") is None for run in runs):
        check_teacher_weights(runs[0]["options"], "compare")
    print(f"[compare] {len(runs)} runs ({', '.join(types)} x seeds {seeds[0]}..{seeds[-1]}), {jobs} at a time, "
          f"{threads} thread(s) each{f', over {gpus} GPU(s)' if gpus else ''}; outputs under {out}", flush=True)
    with OutputLock(out / ".lock", f"compare --out '{out}'"):
        with stop_on_sigterm() as children:  # stopped, compare stops its runs (each saves its last.ckpt), no table
            check_same_options(runs)
            made_from = {"options": runs[0]["options"], "runs": [[r["type"], r["seed"]] for r in runs]}
            check_table_replaceable(out, made_from, overwrite)
            started = time.monotonic()
            runs = run_all(runs, jobs, threads, gpus, children)
            test_set = measure_held_out(runs, held_out, children, threads) if held_out is not None else None
            summary = summarize_runs(runs, types)
            held = summary.get("held_out") or {}
            held_note = "" if not held else (f"; held-out: each run's final checkpoint"
                                             f"{' and its teacher(s)' if held['teacher_acc'] is not None else ''} on "
                                             f"{held_out}")
            table = format_table(summary)
            wall = time.monotonic() - started
            speed = measure_comparison(runs, threads=1) if plot else None
            if speed:
                table += "\n\n" + speed_table(summary, speed)
                title = " ".join(["distill compare", *(f"--config {Path(c).name}" for c in config), *extra,
                                  f"--types {','.join(types)} ({len(seeds)} seed(s))"])
                draw(summary, speed, out / "accuracy_vs_speed.png", title)
            record = {"config": config if len(config) > 1 else config[0], "extra": extra, "made_from": made_from,
                      "seeds": seeds, "jobs": jobs, "threads": threads, "wall_time_s": round(wall, 1), "summary": summary,
                      "runs": [{"type": r["type"], "seed": r["seed"], "result": r["result"],
                                **({"held_out": r["held_out"]} if r.get("held_out") else {})} for r in runs],
                      "speed": speed, "test": test_set}
            with write_atomically(out / "compare.json") as partial:
                partial.write_text(json.dumps(record, indent=2))
            with write_atomically(out / "compare.md") as partial:
                partial.write_text(f"`{command_line}`\n\n```\n{table}\n```\n\n(validation top-1 in %, mean +- standard "
                                   f"deviation over {len(seeds)} seed(s){held_note}; this call's wall time {wall:.0f} s)\n")
    print(table)
    print(f"(validation top-1 in %, mean +- std over seeds {seeds[0]}..{seeds[-1]}{held_note}; written to "
          f"{out / 'compare.md'}{'' if not speed else ', the figure to ' + str(out / 'accuracy_vs_speed.png')})")


compare.__doc__ = compare.__doc__.replace("{methods}", ", ".join(method_names()))  # --help lists the table


main = command("distill compare", compare, extra="each run's distill fit (e.g. --data.dataset, --trainer.max_epochs)",
               description=__doc__.split("\n\n")[0])
