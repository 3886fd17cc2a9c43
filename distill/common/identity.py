"""What a result was made from: options by their values, files by their bytes, never by paths or command lines.

A run, a pipeline stage, a compare run and an export each record the identity of what made them; a later
command that would reuse (skip or resume) them compares it with the identity of what it would make now:

- `options_identity`: resolved options as flat dotted keys (`model.lr: 0.001`), without the options that
  say where outputs go or how a run is watched (`LEFT_OUT`); an option naming an existing file (teacher
  weights, `model.init_from`) stands for the file's content (`sha256:...`), so the same file under another
  path is the same run; one naming an existing folder stands for its files' content (distill/common/digests.py: a
  data folder or a teacher's export folder moved elsewhere is the same, regenerated or re-exported is not), a
  teacher cache for its meta.json (`CONTENT_OF`).
  `distill.training.cli.fit_options` gives it for a `distill fit` command that has not run yet (the fit
  command's own parser merges its config files and options), for the drivers (pipeline, compare) that decide
  before they start a process.
- `differences`: the keys that differ, as `key: before -> now`, for the one-line refusal.
- `finished` / `trained_something`: whether a run folder (a pipeline stage, a compare run) holds a finished
  result, or anything trained at all.

Hand-written: a content identity of resolved options is what neither Lightning nor jsonargparse records.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from distill.common.digests import folder_digest
from distill.common.errors import UserError

__all__ = [
    "LEFT_OUT",
    "describe_differences",
    "differences",
    "file_digest",
    "verify_files",
    "finished",
    "as_recorded_now",
    "options_change",
    "options_identity",
    "read_record",
    "trained_something",
]

# Options that say where outputs go, how a run is watched, checked or stopped, or on which hardware kind it runs,
# never what it computes (views replay exactly whatever the worker count: docs/reliability.md). A key or any key
# below it. `trainer.callbacks` are taken as observers (a learning-rate monitor added on resume, the tests' signal
# senders): a callback that changes training (StochasticWeightAveraging, EarlyStopping) is the user's to keep.
# `model.teacher_cache` is linked from `data.teacher_cache`, which counts by content.
LEFT_OUT = ("config", "ckpt_path", "metrics_json", "print_config", "checkpoint", "trainer.default_root_dir",
            "trainer.logger", "trainer.callbacks", "trainer.enable_progress_bar", "trainer.enable_model_summary",
            "trainer.enable_checkpointing", "trainer.log_every_n_steps", "trainer.profiler", "trainer.max_time",
            "trainer.limit_test_batches", "trainer.limit_predict_batches", "trainer.num_sanity_val_steps",
            "trainer.detect_anomaly", "trainer.enable_autolog_hparams", "trainer.accelerator", "trainer.strategy",
            "data.num_workers", "telemetry", "model.teacher_cache", "model.teacher_cache_verify",
            "model.finite_check_every", "model.compile", "model.fused_optimizer")
# A folder option that stands for one file of it: a teacher cache is its teacher, data fingerprint and shards.
CONTENT_OF = {"data.teacher_cache": "meta.json"}
LOCAL_DIR = "local-dir:"  # timm's model name for a folder it loads (`model_name: local-dir:exports/x`)


_CHUNK = 1 << 20
_UNSET = object()


def file_digest(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def verify_files(folder: str | os.PathLike, report_name: str, names: Iterable[str], option: str,
                 again: str) -> dict[str, str]:
    """Check that each of `names` in `folder` is the file its writer recorded in `report_name` (a JSON file of the
    folder whose `files` maps a file name to its `file_digest`); returns the digests of `names`.

    A report that is missing or unreadable, a name it does not list, or a file whose bytes changed is a `UserError`
    naming the file and ending with `again` (how to write the folder anew)."""
    folder = Path(folder)
    report_path = folder / report_name
    try:
        files = json.loads(report_path.read_text(encoding="utf-8")).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        why = "is missing" if not report_path.exists() else "is not readable JSON holding the digest of each file"
        raise UserError(f"{option}: '{report_path}' {why}, so what '{folder}' holds cannot be checked; {again}") from err
    if not isinstance(files, dict):
        raise UserError(f"{option}: '{report_path}' lists no file digests ('files'); {again}")
    digests = {}
    for name in names:
        path = folder / name
        if name not in files:
            raise UserError(f"{option}: '{path}' was not written with the rest of '{folder}' (it is not in "
                            f"{report_name}); {again}")
        try:
            found = file_digest(path)
        except OSError as err:
            raise UserError(f"{option}: '{path}' cannot be read ({err.strerror or err}); {again}") from err
        if found != files[name]:
            raise UserError(f"{option}: '{path}' changed since it was written (its sha256 is not the one in "
                            f"{report_name}); {again}")
        digests[name] = found
    return digests


def _left_out(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in LEFT_OUT)


def _flatten(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), into)
    elif prefix:
        into[prefix] = value


def _plain(value: Any) -> Any:
    """A JSON value for an option's value; a string naming an existing file is that file's content digest, one
    naming an existing folder the digest of its files (`folder_digest`)."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bool):
        text = os.fspath(value)
        if text and "://" not in text and "\n" not in text and len(text) < 4096:
            try:
                if Path(text).is_file():
                    return file_digest(text)
                if Path(text).is_dir():  # a teacher's export folder, a dataset: what it holds, wherever it is
                    return folder_digest(text)
                if text.startswith(LOCAL_DIR) and Path(text[len(LOCAL_DIR):]).is_dir():  # timm's folder, by content
                    return LOCAL_DIR + folder_digest(text[len(LOCAL_DIR):])
            except OSError:
                pass
        return _digits_as_number(text)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return None
    for kind in (bool, int, float):  # jsonargparse's PositiveInt etc. as plain numbers (a checkpoint loads them)
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _digits_as_number(value: Any) -> Any:
    """jsonargparse gives a `str | int` option (trainer.devices) as '2' from the command line, 2 from a file: a
    string of digits counts as its number."""
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19 else value


def _content(value: Any) -> Any:
    """A `local-dir:sha256:...` model name as its folder's digest (to say that the folder's content changed)."""
    return value[len(LOCAL_DIR):] if isinstance(value, str) and value.startswith(LOCAL_DIR + "sha256:") else value


def options_identity(options: Mapping[str, Any]) -> dict[str, Any]:
    """Flat, JSON-comparable identity of nested (or dotted) options, `LEFT_OUT` removed."""
    flat: dict[str, Any] = {}
    _flatten(options, "", flat)
    for key, name in CONTENT_OF.items():
        if isinstance(flat.get(key), (str, os.PathLike)) and (Path(flat[key]) / name).is_file():
            flat[key] = Path(flat[key]) / name
    return {key: _plain(flat[key]) for key in sorted(flat) if not _left_out(key)}


def differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`key: before -> now` for each key whose value differs (absent keys shown as `(unset)`)."""
    def show(value: Any) -> str:
        text = "(unset)" if value is _UNSET else json.dumps(value)
        return text if len(text) <= 60 else text[:28] + "..." + text[-28:]

    def change(key: str) -> str:
        was, is_ = before.get(key, _UNSET), now.get(key, _UNSET)
        old, new = _content(was), _content(is_)
        if all(isinstance(v, str) and v.startswith("sha256:") for v in (old, new)):  # a file or folder by content
            return f"{key}: its content changed (sha256 {old[7:19]}... -> {new[7:19]}...)"
        return f"{key}: {show(was)} -> {show(is_)}"

    keys = sorted(set(before) | set(now))
    return [change(key) for key in keys if before.get(key, _UNSET) != now.get(key, _UNSET)]


def describe_differences(before: Mapping[str, Any], now: Mapping[str, Any], shown: int = 3) -> str:
    """The first `shown` differences on one line, and how many more."""
    found = differences(before, now)
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return "; ".join(found[:shown]) + more


def read_record(path: Path) -> dict[str, Any] | None:
    """A run folder's JSON record of what made it (a stage's stage.json, a compare run's run.json), or None when it
    is missing, unreadable or not a mapping."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def as_recorded_now(options: Any) -> Any:
    """A record's options as `options_identity` writes them today (a digit string as its number: records written
    before that rule hold trainer.devices '2'; a `local-dir:FOLDER` teacher as its folder's content, as records
    written before that rule named it by its path alone); anything that is not a mapping is returned as it is."""
    if not isinstance(options, Mapping):
        return options
    return {key: _local_dir_by_content(_digits_as_number(value)) for key, value in options.items()}


def _local_dir_by_content(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(LOCAL_DIR) and not value.startswith(LOCAL_DIR + "sha256:"):
        return _plain(value)
    if isinstance(value, list):  # an ensemble's members, each with its model_name
        return [_local_dir_by_content(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _local_dir_by_content(v) for k, v in value.items()}
    return value


def options_change(before: Any, now: Mapping[str, Any], record: str) -> str:
    """Why a folder's results are not what options `now` would make, for a one-line refusal: the options that
    differ (`key: then -> now`), or that its `record` holds none (an earlier version of distill, or edited)."""
    if not isinstance(before, Mapping):
        return f"its {record} does not record the options it was made from (an earlier version of distill, or edited)"
    return f"its options changed ({describe_differences(before, now)}, as then -> now)"


def trained_something(folder: Path) -> bool:
    """Whether a stage or run folder holds a result or a checkpoint (a run that failed on a bad option does not)."""
    return (folder / "result.json").is_file() or any((folder / "checkpoints").glob("*.ckpt"))


def finished(result_file: Path) -> dict[str, Any] | None:
    """The stage's result if it finished: its result.json says it trained and its best checkpoint exists."""
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        return None
    trained = result.get("steps", 1) > 0  # result files of older versions have no step count
    best = result.get("best_checkpoint")
    if best and not Path(best).is_file():  # the run folder was moved, or named from another folder: look beside it
        best = str(result_file.parent / "checkpoints" / Path(best).name)
    return {**result, "best_checkpoint": best} if trained and best and Path(best).is_file() else None
