"""`distill pipeline`: teacher -> distillation -> hi-res fine-tunes -> export, resumable.

    distill pipeline --config configs/pipeline.yaml [any fit option for every stage, e.g. --trainer.devices 2]

Each stage is a `distill fit` in its own process (so a stage can run under DDP and a crash
of one stage leaves the others' files alone) writing under `<root>/<name>/<stage>/`:
TensorBoard logs, `checkpoints/{best,last}.ckpt` and, once finished, `result.json`
(the best checkpoint's validation metrics). Running the same command again skips stages
with a `result.json`, resumes a stage that has a `last.ckpt` from it, and starts the others,
but only a stage made from what it would be made from now (`stage.json`: its merged options
and its upstream checkpoints by content; a changed stage is refused, naming what changed). The
export is redone when its checkpoint (by content) or its options changed, and kept otherwise.
A stage can take its teacher from an earlier stage's best checkpoint (`teacher_from`) and
start its student from another's (`init_from`: position embeddings resampled when the
image size changes). See configs/pipeline.yaml for the format.

Paths: a stage's `config` is relative to the pipeline file (the command works from any
folder); outputs go under `root` relative to the current folder, like `distill fit`'s (the same
root reached from another folder is the same pipeline). A stage
counts as finished only when its `result.json` says it trained (steps > 0) and its best
checkpoint exists; two pipelines writing the same root at once are refused. The pipeline's and
the stages' names are folder names, checked before anything runs (distill/common/names.py).
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from distill.common.argv import given, last_value, values
from distill.common.commandline import command
from distill.common.errors import UserError
from distill.common.files import OutputLock, load_yaml, write_atomically
from distill.common.checkpoints import recorded_run_options
from distill.common.identity import as_recorded_now, differences, finished, options_change, read_record, trained_something
from distill.common.names import DIGITS, check_name, data_folder_name, same_folder
from distill.common.processes import STOPPED, stop_on_sigterm
from distill.common.tables import format_rows
from distill.training.cli import fit_options

__all__ = ["run_pipeline", "load_spec", "main", "finished"]

STAGE_KEYS = {"name", "config", "overrides", "teacher_from", "init_from"}
# set by the pipeline for each stage (its folder, its result file, its resume point, the best.ckpt later stages read)
RESERVED = ("checkpoint.dirpath", "metrics_json", "ckpt_path", "trainer.logger.init_args.save_dir",
            "trainer.logger.init_args.name", "checkpoint.filename")
# what else the pipeline writes in <root>/<name>/ beside the stage folders; its lock and the export's working
# folders start with '.', as no name may (distill/common/names.py)
TAKEN = {"export": "the pipeline's export folder (<root>/<name>/export)"}
VERSION = "trainer.logger.init_args.version"  # TensorBoard's folder in the stage's: a name, if text
IN_STAGE = {name: "the stage's own " + name for name in ("checkpoints", "result.json", "stage.json")}


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a pipeline file; errors name the file and the offending entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline: config '{path}' does not exist")
    spec = load_yaml(path)
    if not isinstance(spec, dict):
        raise UserError(f"pipeline '{path}': needs a mapping with 'name' and 'stages', got "
                        f"{'an empty file' if spec is None else 'a ' + type(spec).__name__}")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"pipeline '{path}': needs a non-empty list of 'stages' (and a 'name', or --data.dataset to "
                        "name the pipeline after the data)")
    unknown_top = set(spec) - {"name", "root", "stages", "export"}
    if unknown_top:
        raise UserError(f"pipeline '{path}': unknown key(s) {sorted(unknown_top)}; accepted: name, root, stages, export")
    if spec.get("name") is not None:  # without one, the pipeline is named after its data (`data_name`)
        check_name(spec["name"], f"pipeline '{path}': name")
    if not isinstance(spec.get("root", ""), str):
        raise UserError(f"pipeline '{path}': root must be a folder (text), got {spec['root']!r}")
    seen: list[str] = []
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise UserError(f"pipeline '{path}': each stage must be a mapping with name and config, got {stage!r}")
        unknown = set(stage) - STAGE_KEYS
        if unknown or "name" not in stage or "config" not in stage:
            raise UserError(f"pipeline '{path}': stage {stage.get('name', '?')} needs name and config, "
                            f"accepts {sorted(STAGE_KEYS)}; got {sorted(unknown) or 'no name/config'}")
        check_name(stage["name"], f"pipeline '{path}': stages[{index}].name", TAKEN)
        wrong = [key for key, kind in (("config", str), ("overrides", dict), ("teacher_from", str), ("init_from", str))
                 if stage.get(key) is not None and not isinstance(stage[key], kind)]
        if wrong:
            raise UserError(f"pipeline '{path}': stage {stage['name']!r}: {wrong[0]} must be "
                            f"{'a mapping of option: value' if wrong[0] == 'overrides' else 'text'}, got {stage[wrong[0]]!r}")
        for ref in ("teacher_from", "init_from"):
            if stage.get(ref) and stage[ref] not in seen:
                raise UserError(f"pipeline '{path}': stage {stage['name']}: {ref} '{stage[ref]}' is not an earlier stage")
        twin = next((name for name in seen if same_folder(name, stage["name"])), None)
        if twin is not None:
            raise UserError(f"pipeline '{path}': two stages are named {stage['name']}" if twin == stage["name"] else
                            f"pipeline '{path}': stages '{twin}' and '{stage['name']}' differ only in case, so they "
                            "share a folder on a case-insensitive filesystem (macOS, Windows); rename one")
        config = path.parent / stage["config"]  # relative to the pipeline file, not to the current folder
        if not config.is_file():
            raise UserError(f"pipeline '{path}': stage {stage['name']}: config '{stage['config']}' does not exist "
                            f"(looked for '{config}', relative to the pipeline file)")
        _check_outputs_left_alone(stage, f"pipeline '{path}': stages[{index}].overrides", config)
        stage["config"] = str(config)
        seen.append(stage["name"])
    export = spec.get("export")
    if export is not None and not isinstance(export, dict):
        raise UserError(f"pipeline '{path}': export must be a mapping (from:, onnx:, torchscript:, int8:), got {export!r}")
    unknown_export = set(export or {}) - {"from", "onnx", "torchscript", "int8", "int8_max_drop"}
    if unknown_export:
        raise UserError(f"pipeline '{path}': export: unknown key(s) {sorted(unknown_export)}; accepted: from, onnx, "
                        "torchscript, int8, int8_max_drop")
    drop = (export or {}).get("int8_max_drop")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0):
        raise UserError(f"pipeline '{path}': export.int8_max_drop must be a number of points, 0 or more, got {drop!r}")
    for key in ("onnx", "torchscript", "int8"):
        if key in (export or {}) and not isinstance(export[key], bool):
            raise UserError(f"pipeline '{path}': export.{key} must be true or false, got {export[key]!r}")
    if export and export.get("int8") and not export.get("onnx", True):
        raise UserError(f"pipeline '{path}': export.int8 quantizes the ONNX model: set export.onnx to true")
    if export and export.get("from") not in seen:
        raise UserError(f"pipeline '{path}': export.from '{export.get('from')}' is not a stage")
    return spec


def _check_outputs_left_alone(stage: dict[str, Any], where: str, config: Path) -> None:
    """A stage's overrides leave the options that place its outputs to the pipeline, and a logger version given as
    text (in its overrides or config file) is a name like the stage's own."""
    for key, value in _flat(stage.get("overrides") or {}):
        if key in RESERVED:
            raise UserError(f"{where}: {key} is set by the pipeline for each stage; leave it out")
        if key == VERSION and isinstance(value, str):
            check_name(value, f"{where}.{key}", IN_STAGE)
    content = load_yaml(config)
    for key, value in _flat(content if isinstance(content, dict) else {}):
        if key == VERSION and isinstance(value, str):
            check_name(value, f"{config}: {key}", IN_STAGE)


def _flat(options: dict[Any, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """`(dotted.key, value)` of a mapping of options, nested or written with dots."""
    pairs = []
    for key, value in options.items():
        key = f"{prefix}{key}"
        pairs += _flat(value, key + ".") if isinstance(value, dict) and value else [(key, value)]
    return pairs


def stage_command(stage: dict[str, Any], root: Path, extra: list[str], resume: bool = True) -> list[str]:
    """The `distill fit` command line of one stage (`resume`: from its last.ckpt, where it has one)."""
    out = root / stage["name"]
    args = [sys.executable, "-m", "distill", "fit", "--config", stage["config"]]
    for key, value in (stage.get("overrides") or {}).items():
        args.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    args += [f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={stage['name']}",
             f"--checkpoint.dirpath={out / 'checkpoints'}", "--checkpoint.filename=best",
             f"--metrics_json={out / 'result.json'}"]
    if stage.get("teacher_from"):
        args.append(f"--model.teacher.init_args.weights={root / stage['teacher_from'] / 'checkpoints' / 'best.ckpt'}")
    if stage.get("init_from"):
        args.append(f"--model.init_from={root / stage['init_from'] / 'checkpoints' / 'best.ckpt'}")
    last = out / "checkpoints" / "last.ckpt"
    if resume and last.is_file():
        args.append(f"--ckpt_path={last}")
    return [*args, *extra]


def export_command(export: dict[str, Any], best: str | Path, out: Path) -> list[str]:
    """The `distill export` command line of the pipeline's export (a process of its own, like a stage)."""
    args = [sys.executable, "-m", "distill", "export", "--ckpt", str(best), "--out", str(out), "--overwrite_stale"]
    args += [] if export.get("onnx", True) else ["--no-onnx"]
    args += [] if export.get("torchscript", True) else ["--no-torchscript"]
    args += ["--int8"] if export.get("int8") else []
    return args + ([f"--int8_max_drop={export['int8_max_drop']}"] if export.get("int8_max_drop") is not None else [])


def run_pipeline(config: str | Path, extra: list[str] | None = None, root: str | Path | None = None,
                 name: Optional[str] = None) -> list[dict]:
    """Run (or resume) every stage and the export; returns one result per stage.

    Args:
        config: pipeline YAML (see configs/pipeline.yaml, configs/own_data.yaml)
        extra: options for every stage's distill fit (--data.dataset DIR, --trainer.devices 2 ...)
        root: output root (default: the file's root, else runs)
        name: the pipeline's folder under root (default: the file's name, else the data's: the --data.dataset
            folder's name and the first 8 hex digits of its content's sha256, so that other data never shares it)
    """
    spec = load_spec(config)
    if name is not None:
        spec["name"] = check_name(name, "pipeline --name", None)
    elif spec.get("name") is None:
        dataset = last_value(extra or [], "--data.dataset")
        if dataset is None:
            raise UserError(f"pipeline '{config}': has no 'name'; give --data.dataset DIR (the runs are then named "
                            "after the data) or --name NAME")
        spec["name"] = data_folder_name(dataset)
    root = Path(root or spec.get("root", "runs")).absolute() / spec["name"]  # stages and results name it whole
    reserved = [key for key in RESERVED if given(extra or [], f"--{key}")]
    if reserved:
        raise UserError(f"pipeline: --{reserved[0]} is set by the pipeline for each stage; leave it out")
    for version in values(extra or [], f"--{VERSION}"):
        check_name(version, f"pipeline: --{VERSION}", IN_STAGE)
    if root.exists() and not root.is_dir():
        raise UserError(f"pipeline --root: '{root}' is a file, not a folder")
    with OutputLock(root / ".lock", f"pipeline root '{root}'"):
        return _run_stages(spec, root, extra)


def stage_identity(stage: dict[str, Any], root: Path, extra: list[str]) -> dict[str, Any]:
    """What a stage's result is made from: the merged options of its fit (its config file's content, its overrides,
    the options given to every stage) with the checkpoints of the stages it starts from by their content; neither
    the paths that named them nor the folder the pipeline runs from (distill/common/identity.py)."""
    where = f"pipeline: stage '{stage['name']}'"
    if stage.get("teacher_from") and isinstance(
            fit_options(stage_command({**stage, "teacher_from": None}, root, extra, resume=False)[4:], where)
            .get("model.teacher"), list):
        raise UserError(f"pipeline: stage '{stage['name']}' takes teacher_from '{stage['teacher_from']}', but its "
                        f"config '{stage['config']}' gives a list of teachers (an ensemble), of which teacher_from "
                        "would replace the last member alone; name each member's weights in the config instead")
    refs = {ref: stage[ref] for ref in ("teacher_from", "init_from") if stage.get(ref)}
    return {"options": fit_options(stage_command(stage, root, extra, resume=False)[4:], where), "from": refs}


def _upstream_only(stage: dict[str, Any], before: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether only the checkpoints a stage starts from changed (its upstream stages were trained again)."""
    changed = {line.split(":")[0] for line in differences(before, identity["options"])}
    upstream = {f"model.{k}" for k in ("teacher.init_args.weights", "init_from")}
    return changed <= upstream and any(stage.get(r) for r in ("teacher_from", "init_from"))


def _check_unchanged(stage: dict[str, Any], root: Path, identity: dict[str, Any]) -> None:
    """A stage is skipped or resumed only if it was made from the options and upstream results it would be made
    from now; a folder in which nothing was trained is simply started again."""
    folder = root / stage["name"]
    record = folder / "stage.json"
    if not record.is_file() or not trained_something(folder):
        return
    recorded = read_record(record) or {}
    before, refs_before = as_recorded_now(recorded.get("options")), recorded.get("from", {})
    if before == identity["options"] and refs_before == identity["from"]:
        return
    if refs_before == identity["from"] and as_recorded_now(recorded_run_options(folder)) == identity["options"]:
        # a record of an earlier version (without the defaults), whose checkpoint says it was made from these options
        with write_atomically(record) as partial:
            partial.write_text(json.dumps(identity, indent=2))
        return
    if not isinstance(before, dict) or refs_before == identity["from"] and not _upstream_only(stage, before, identity):
        what = options_change(before, identity["options"], "stage.json")
    elif refs_before != identity["from"]:
        what = f"it started from other stages then ({refs_before} -> {identity['from']})"
    else:
        refs = [stage[r] for r in ("teacher_from", "init_from") if stage.get(r)]
        what = f"the stage(s) it starts from ({', '.join(dict.fromkeys(refs))}) were trained again since"
    raise UserError(f"pipeline: stage '{stage['name']}' in '{folder}' was made earlier, but {what}; its results "
                    "would not be this pipeline's: restore the options, write this pipeline elsewhere (--root DIR), or "
                    f"remove '{folder}' to train the stage again (its results are then lost)")


def _run_stages(spec: dict[str, Any], root: Path, extra: list[str] | None) -> list[dict]:
    results = []
    for stage in spec["stages"]:
        result_file = root / stage["name"] / "result.json"
        identity = stage_identity(stage, root, extra or [])
        _check_unchanged(stage, root, identity)
        if finished(result_file) is not None:
            print(f"[pipeline] {stage['name']}: finished earlier, skipped", flush=True)
        else:
            (root / stage["name"]).mkdir(parents=True, exist_ok=True)
            with write_atomically(root / stage["name"] / "stage.json") as partial:  # a kill never leaves half of it
                partial.write_text(json.dumps(identity, indent=2))
            command = stage_command(stage, root, extra or [])
            resumed = last_value(command, "--ckpt_path")
            print(f"[pipeline] {stage['name']}: " + (f"resuming from {resumed}" if resumed else "starting"), flush=True)
            code = _run_stage(command)
            if code in (STOPPED, -signal.SIGTERM):  # stopped by Lightning's handler, or before it was installed
                print(f"[pipeline] {stage['name']}: stopped by SIGTERM, its last.ckpt saved; "
                      "re-run the same command to resume it", file=sys.stderr, flush=True)
                raise SystemExit(STOPPED)
            if code != 0 or finished(result_file) is None:
                _stop_after_failure(f"stage '{stage['name']}'", code, "to resume the stage")
        results.append({"stage": stage["name"], **finished(result_file)})
    export = spec.get("export")
    if export:  # `distill export` keeps an export made from the same checkpoint (by content) with the same options
        best = next(r["best_checkpoint"] for r in results if r["stage"] == export["from"])
        code = _run_stage(export_command(export, best, root / "export"))
        if code in (STOPPED, -signal.SIGTERM):  # the half-built folder is removed by the export itself
            print("[pipeline] export: stopped by SIGTERM; re-run the same command to export", file=sys.stderr,
                  flush=True)
            raise SystemExit(STOPPED)
        if code != 0:
            _stop_after_failure("export", code, "(finished stages are skipped)")
    print(format_table(results), flush=True)
    for line in verdict(results, spec["stages"], classes_of(last_value(extra or [], "--data.dataset"))):
        print(f"[pipeline] {line}", flush=True)
    if export:
        print(f"[pipeline] next: distill serve --export {root / 'export'}   (or distill predict --export "
              f"{root / 'export'} --images FOLDER)", flush=True)
    return results


def classes_of(dataset: Optional[str]) -> Optional[int]:
    """How many classes the data has, where that is known without loading it: the digits, or an ImageFolder's
    class folders in train/ (hidden ones left out, as training leaves them out)."""
    if dataset is None:  # set in the stages' configs: each stage's result.json says
        return None
    if dataset == DIGITS:
        return 10
    train = Path(dataset) / "train"
    folders = [p for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")] if train.is_dir() else []
    return len(folders) or None


def verdict(results: list[dict], stages: list[dict], classes: Optional[int]) -> list[str]:
    """Whether each stage learned the data, and what to change when it did not: a stage whose best validation top-1
    is near chance did not learn; a student far under its teacher needs a longer schedule. `classes`: the class
    count where a stage's result.json does not record it (results of earlier versions)."""
    lines = []
    for result, stage in zip(results, stages):
        metrics, name = result.get("metrics", {}), result["stage"]
        classes = result.get("num_classes") or classes  # as the stage recorded it (result.json), else as counted
        chance = 1 / classes if classes else None
        acc, teacher = metrics.get("val/acc"), metrics.get("val/teacher_acc")
        if not isinstance(acc, (int, float)):
            continue
        if chance is not None and acc < chance + 0.2 * (1 - chance):
            what = ("the teacher" if not stage.get("teacher_from") and teacher is None else "the student")
            lines.append(f"{name}: {100 * acc:.1f}% is near chance ({100 * chance:.1f}% for {classes} classes): "
                         f"{what} did not learn the data in {result.get('epochs', '?')} epochs. Check that each "
                         "train/<class>/ and val/<class>/ folder holds that class's images; then give it more epochs "
                         "(--trainer.max_epochs) or a lower --model.lr")
        elif isinstance(teacher, (int, float)) and acc < teacher - 0.1:
            lines.append(f"{name}: {100 * (teacher - acc):.1f} points under its teacher ({100 * acc:.1f}% against "
                         f"{100 * teacher:.1f}%) after {result.get('epochs', '?')} epochs: a ViT student on small data "
                         "needs the whole schedule (configs/own_data.yaml trains it 200 epochs)")
        else:
            lines.append(f"{name}: learned the data ({100 * acc:.1f}%"
                         + (f", its teacher {100 * teacher:.1f}%)" if isinstance(teacher, (int, float)) else ")"))
    return lines


def _stop_after_failure(step: str, code: int, then: str) -> None:
    """The step's process printed its own error (one `error:` line for bad input, a traceback for a bug): say which
    step it was and leave with its exit code, without a second error line."""
    print(f"[pipeline] {step} failed (exit {code}, its error is above); fix it and re-run the same command {then}",
          file=sys.stderr, flush=True)
    raise SystemExit(code if code > 0 else 1)


def _run_stage(command: list[str]) -> int:
    """Run one stage, and return its exit status; the pipeline stopped by SIGTERM stops it (it saves its last.ckpt)
    and returns 143."""
    try:
        with stop_on_sigterm() as children:
            return children.start(command).wait()
    except SystemExit as stopped:
        if stopped.code != STOPPED:
            raise
        return STOPPED


def format_table(results: list[dict]) -> str:
    """Stage, resolution, epochs, validation accuracy per head, teacher accuracy, wall time."""
    def pct(value: Any) -> str:
        return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "-"

    header = ("stage", "res", "epochs", "acc_cls", "acc_dist", "acc", "teacher", "wall_s")
    rows = []
    for r in results:
        m = r.get("metrics", {})
        rows.append((r["stage"], str(r.get("img_size", "-")), str(r.get("epochs", "-")), pct(m.get("val/acc_cls")),
                     pct(m.get("val/acc_dist")), pct(m.get("val/acc")), pct(m.get("val/teacher_acc")),
                     f"{r.get('wall_time_s', 0):.0f}"))
    return format_rows(header, rows)


main = command("distill pipeline", run_pipeline, extra="every stage's distill fit (e.g. --trainer.devices 2)",
               description=__doc__.split("\n\n")[0])
