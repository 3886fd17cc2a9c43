"""What a `distill fit` run records and leaves behind, beside what Lightning does.

- `RecordRunOptions`: the run's options (`distill.common.identity.options_identity`) in every checkpoint;
  `refuse_changed_options` compares them when a run is resumed, whatever names the checkpoint
  (a path, `last`) or its config files.
- `SaveConfigBesideRun`: LightningCLI's config.yaml in the logger's version folder, or beside the
  checkpoints without a logger (not one `runs/config.yaml` that every run replaces).
- `RemoveUnusedOutputs`: a failed run leaves no empty output folders.
- `refuse_earlier_run`, `nothing_to_resume`: a checkpoint folder is written only to resume its run, and a
  `--ckpt_path last` that names nothing is refused, never a fresh start.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.utilities.exceptions import SIGTERMException
import yaml
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from distill.common.argv import under
from distill.common.errors import UserError
from distill.common.files import OutputLock
from distill.common.identity import as_recorded_now, describe_differences

__all__ = ["RecordRunOptions", "SaveConfigBesideRun", "RemoveUnusedOutputs", "first_missing", "last_checkpoint",
           "nothing_to_resume", "refuse_changed_options", "refuse_earlier_run", "refuse_overridden"]


class SaveConfigBesideRun(SaveConfigCallback):
    """LightningCLI's config.yaml in the logger's version folder; without a logger beside the run's checkpoints, not in
    `trainer.default_root_dir`, where every run without a logger would replace the previous run's file."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        checkpoint = trainer.checkpoint_callback
        if not trainer.loggers and stage != "fit":  # validate / test / predict of a run: its folder is not theirs
            self.already_saved = True
            return
        if trainer.loggers or self.already_saved or checkpoint is None:
            super().setup(trainer, pl_module, stage)
            return
        folder = Path(checkpoint.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        if trainer.is_global_zero:  # the folder is this run's alone: fit refuses one holding another run's files
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)
        self.already_saved = True


class RecordRunOptions(Callback):
    """Writes the run's options (`distill.common.identity.options_identity`) into every checkpoint, so that resuming it
    with other options is refused whatever names the checkpoint (a path, `last`) or its config files."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_options"] = self.options


def last_checkpoint(config: Any) -> str | None:
    """The file `--ckpt_path last` resumes (the newest `last*.ckpt` of checkpoint.dirpath), if there is one."""
    dirpath = (config.get("checkpoint") or {}).get("dirpath")
    if not dirpath or "://" in str(dirpath) or not Path(dirpath).is_dir():
        return None
    found = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


# How long a run goes: resuming with more epochs or steps continues the same run (its schedule as restored).
LONGER = ("trainer.max_epochs", "trainer.max_steps", "trainer.min_epochs", "trainer.min_steps")


def refuse_changed_options(saved: dict[str, Any], now: dict[str, Any], path: str, resolved: str) -> None:
    """A run resumes only with the options it was started with (config files compared by content, not path), except
    its length (`LONGER`)."""
    saved, now = ({k: v for k, v in options.items() if k not in LONGER} for options in (as_recorded_now(saved), now))
    if saved == now:
        return
    named = f"'{path}' ({resolved})" if path != resolved else f"'{path}'"
    raise UserError(f"ckpt_path: {named} was saved by a run with other options ({describe_differences(saved, now)}, "
                    "as checkpoint -> now); a resumed run continues that run: restore those options, or start a new "
                    "run from its weights with --model.init_from and another --checkpoint.dirpath")


def nothing_to_resume(config: Any, fit: bool) -> str:
    """Why `--ckpt_path last` names no checkpoint, and the ways on (`fit`: it resumes; otherwise it evaluates)."""
    dirpath = (config.get("checkpoint") or {}).get("dirpath")
    if not dirpath:
        return ("ckpt_path: 'last' is the newest last.ckpt of checkpoint.dirpath, which is not set; give "
                "--checkpoint.dirpath (the run's folder) or --ckpt_path PATH.ckpt")
    folder = Path(dirpath)
    held = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    if held and fit:
        return (f"ckpt_path: 'last': '{dirpath}' holds no last.ckpt to resume (it holds {', '.join(held)}); resume "
                f"from one of those with --ckpt_path PATH, or start a new run from its weights with --model.init_from "
                "PATH and another --checkpoint.dirpath")
    if held:
        return (f"ckpt_path: 'last': '{dirpath}' holds no last.ckpt (it holds {', '.join(held)}); give the "
                "checkpoint to evaluate with --ckpt_path PATH")
    state = "it is empty" if folder.is_dir() else "it does not exist"
    if fit:
        return f"ckpt_path: 'last': '{dirpath}' holds no checkpoint to resume ({state}); drop --ckpt_path to start " \
               "a new run there"
    return f"ckpt_path: 'last': '{dirpath}' holds no checkpoint ({state}); give the checkpoint to evaluate with " \
           "--ckpt_path PATH"


def refuse_earlier_run(dirpath: Path, ckpt_path: str | None, metrics_json: str | None) -> None:
    """Nothing an earlier run wrote is replaced: its checkpoint folder is written only to resume that run."""
    earlier = sorted(p.name for p in dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
    if metrics_json and Path(metrics_json).is_file() and not (ckpt_path and earlier):  # only the run resumed wrote it
        if not earlier:
            raise UserError(f"metrics_json: '{metrics_json}' exists and this run resumes nothing in '{dirpath}'; "
                            "choose another metrics_json or remove it")
        earlier.append(str(metrics_json))
    if not earlier:
        return
    if not ckpt_path:
        raise UserError(f"checkpoint.dirpath: '{dirpath}' holds an earlier run's {', '.join(earlier)}; resume that run "
                        "with --ckpt_path last, or write this one elsewhere with --checkpoint.dirpath DIR")
    if ckpt_path not in ("last", "best", "hpc", "registry") and Path(ckpt_path).resolve().parent != dirpath.resolve():
        raise UserError(f"checkpoint.dirpath: '{dirpath}' holds another run's {', '.join(earlier)}, which resuming from "
                        f"'{ckpt_path}' would replace; set --checkpoint.dirpath to '{Path(ckpt_path).parent}' (that run's "
                        "folder) or to an empty folder")


class RemoveUnusedOutputs(Callback):
    """A fit that fails leaves no empty output folders: each folder it was to write and that did not exist before
    (the checkpoint folder, the TensorBoard version folder, metrics_json's folder) is removed if it holds nothing but
    config.yaml / hparams.yaml and TensorBoard files without a single curve point, and so are the parents it created,
    if they are then empty (another run may be writing beside it). Not on SIGTERM or Ctrl+C, which save a last.ckpt to
    resume from.

    Args:
        folders: the output folders; those that exist already are left alone.
        lock: the checkpoint folder's lock of this run, released first (its file is in that folder).
    """

    def __init__(self, folders: list[str | os.PathLike], lock: OutputLock | None = None) -> None:
        made = [(Path(folder).absolute(), first_missing(folder)) for folder in folders if "://" not in str(folder)]
        self.made = [(leaf, top) for leaf, top in made if top is not None]
        self.lock = lock

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.is_global_zero:
            for logger in trainer.loggers:  # its writer thread flushes on its own: closed first, or it writes into a
                logger.finalize("failed")   # removed folder and its FileNotFoundError replaces the run's error
            self.remove()

    def remove(self) -> None:
        """Remove the unused folders now (also for a failure outside `trainer.fit`)."""
        if self.lock is not None:
            self.lock.release()
        for leaf, top in self.made:
            files = [p for p in leaf.rglob("*") if p.is_file()] if leaf.is_dir() else None
            if files is None or not all(p.name in ("config.yaml", "hparams.yaml") or _events_without_scalars(p)
                                        for p in files):
                continue
            shutil.rmtree(leaf, ignore_errors=True)
            for parent in leaf.parents:  # up to the outermost folder this run created, while empty
                if not (parent == top or top in parent.parents):
                    break
                try:
                    parent.rmdir()
                except OSError:  # not empty: another run writes there
                    break


def first_missing(folder: str | os.PathLike) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (what writing `folder` creates)."""
    path, missing = Path(folder).absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    return missing


def _events_without_scalars(path: Path) -> bool:
    """A TensorBoard event file holding no curve point: only the HPARAMS session and its `hp/` placeholders, written
    when its logger started (distill/training/telemetry.py), before any step."""
    if not path.name.startswith("events.out.tfevents."):
        return False
    try:
        tags = {value.tag for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    except Exception:  # unreadable: not ours to judge, keep it
        return False
    return all(tag.startswith(("hp/", "_hparams_/")) for tag in tags)


def refuse_overridden(argv: list[str], hparams: dict[str, Any], subcommand: str, path: str) -> None:
    """LightningCLI lays a checkpoint's hyper-parameters over the command line: a value typed there would be ignored
    (a model option, or a method's own: --model.distillation.beta)."""
    given = under(argv, "model")
    missing = object()
    differ = []
    for key, value in given.items():
        saved = _saved_value(hparams, key, missing)
        if saved is not missing and not _same_value(value, saved):
            differ.append(f"model.{key}={value} (the checkpoint has {saved!r})")
    if not differ:
        return
    what = "a resumed run keeps the checkpoint's values" if subcommand == "fit" else "the model is rebuilt from it"
    raise UserError(f"ckpt_path: '{path}' sets {', '.join(differ[:3])}; {what}, so the command line's would be "
                    "ignored: drop them, or start a new run from its weights with model.init_from")


def _saved_value(hparams: dict[str, Any], key: str, missing: Any) -> Any:
    """The checkpoint's value of a dotted model option (a class's own through its init_args), or `missing`."""
    parts = [part for part in key.split(".") if part != "init_args"]
    node: Any = hparams
    for depth, part in enumerate(parts):
        if depth and isinstance(node, dict) and "class_path" in node:
            node = node.get("init_args") or {}
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _same_value(text: str, saved: Any) -> bool:
    """Whether a command-line value means the saved one (5e-4 and 0.0005 alike; null and None)."""
    if isinstance(saved, dict) and "class_path" in saved:  # a class given by name or path (its options come apart)
        return text in (saved["class_path"], saved["class_path"].rpartition(".")[2])
    if isinstance(saved, bool) or saved is None:
        return str(yaml.safe_load(text)).lower() == str(saved).lower() or (saved is None and text.lower() == "none")
    if isinstance(saved, (int, float)):
        try:
            return float(text) == float(saved)
        except ValueError:
            return False
    return text == str(saved) or yaml.safe_load(text) == saved
