"""Where this project reaches into a library's private or internal members: all of it, in one place.

Each call below has no public equivalent (the reason is beside it); every other module calls
these functions instead of the members. The hooks the project *overrides* in subclasses
(Lightning's checkpoint callback and CLI, torch's `Module._apply`) cannot move here; they are
listed in `OVERRIDDEN`. `tests/test_private_library_members.py` checks every entry against the installed
libraries, so an upgrade that renames or removes one fails there, by name, and not in the
middle of a user's run.
"""
from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from timm.data import Mixup

__all__ = ["mixup_draw", "dump_checkpoint", "batches_done_this_epoch", "option_names", "is_local_path", "OVERRIDDEN"]

# (class, member) the project overrides or reads as a subclass; each must exist on the installed version
OVERRIDDEN = [
    (torch.nn.Module, "_apply"),  # the teacher is not a submodule, yet must follow .to() / .half(): Lightning's own way
    (ModelCheckpoint, "_save_checkpoint"),  # atomic checkpoint writes (write beside, rename)
    (ModelCheckpoint, "_save_last_checkpoint"),  # last.ckpt on a stop signal and when the parent skips it
    (ModelCheckpoint, "_monitor_candidates"),
    (ModelCheckpoint, "_should_skip_saving_checkpoint"),
    (LightningCLI, "_parse_ckpt_path"),  # ckpt_path checked (and 'last' resolved) before Lightning reads it
]
# instance attributes of ModelCheckpoint the callbacks read and set
CHECKPOINT_ATTRIBUTES = ["_last_global_step_saved"]


def mixup_draw(mixup: Mixup) -> tuple[float, bool]:
    """timm's draw of (lam, use_cutmix) for one batch from numpy's global generator: `Mixup.__call__` draws and
    mixes in one step, and each fixed pair of this project needs the draw alone, under the pair's seed."""
    return mixup._params_per_batch()


def dump_checkpoint(trainer: pl.Trainer, weights_only: bool) -> dict[str, Any]:
    """The checkpoint dict of the current state: `trainer.save_checkpoint` also runs a barrier, which waits forever
    when a stop signal reaches DDP ranks at different batches and rank 0 alone saves last.ckpt."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def batches_done_this_epoch(trainer: pl.Trainer) -> int:
    """Training batches completed in the current epoch (Lightning's loop progress; no public counter has it)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option name of a (jsonargparse) parser and its subcommands, for "did you mean" hints: argparse keeps
    its actions and subparsers in private members only."""
    names = {action.dest for action in parser._actions if action.dest and action.dest != "help"}
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in (subcommands._name_parser_map.values() if subcommands else []):
        names |= option_names(sub)
    return names


def is_local_path(path: str) -> bool:
    """A path on the local file system, not an object store URL (s3://, gs://...), as Lightning decides it (its
    checkpoint I/O treats the two differently; the function is private to lightning_fabric)."""
    return _is_local_file_protocol(path)
