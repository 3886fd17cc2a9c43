"""Where this project reaches into a library's private or internal members: all of it, in one place.

Each call below has no public equivalent (the reason is beside it); every other module calls
these functions instead of the members. The hooks the project *overrides* in subclasses
(Lightning's checkpoint callback and CLI, torch's `Module._apply`) cannot move here; they are
listed in `OVERRIDDEN`, and the private attributes those subclasses read or set in `SUBCLASS_ATTRIBUTES`.
`tests/test_private_library_members.py` checks every entry against the installed libraries, so an
upgrade that renames or removes one fails there, by name, and not in the middle of a user's run; it
also walks the project's code for a private library member used anywhere else.

Classes are named by their import path and Lightning is imported only inside the functions that need
it: the model side (`teachers`) uses this module without importing Lightning.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from timm.data import Mixup

__all__ = ["mixup_draw", "dump_checkpoint", "batches_done_this_epoch", "option_names", "subcommand_parsers", "is_local_path",
           "cpu_computes_bf16", "attention_weights", "OVERRIDDEN", "SUBCLASS_ATTRIBUTES"]

_CHECKPOINT = "pytorch_lightning.callbacks.ModelCheckpoint"
# (class, member) the project overrides or calls as a subclass; each must exist on the installed version
OVERRIDDEN = [
    ("torch.nn.Module", "_apply"),  # the teacher is not a submodule, yet must follow .to() / .half(): Lightning's own way
    (_CHECKPOINT, "_save_checkpoint"),  # atomic checkpoint writes (write beside, rename)
    (_CHECKPOINT, "_save_last_checkpoint"),  # last.ckpt on a stop signal and when the parent skips it
    (_CHECKPOINT, "_monitor_candidates"),
    (_CHECKPOINT, "_should_skip_saving_checkpoint"),
    (_CHECKPOINT, "_should_save_on_train_epoch_end"),  # the epoch-end save decides like the parent's
    ("pytorch_lightning.cli.LightningCLI", "_parse_ckpt_path"),  # ckpt_path checked (and 'last' resolved) first
    # public, but undocumented: inference processes started with Ctrl+C blocked (distill/commands/serve.py)
    ("litserve.LitServer", "launch_inference_worker"),
    ("litserve.LitServer", "launch_single_inference_worker"),
]
# (class, instance attribute) the subclasses read and set: the parent's own bookkeeping of what it saved
SUBCLASS_ATTRIBUTES = [(_CHECKPOINT, "_last_global_step_saved"), (_CHECKPOINT, "_last_checkpoint_saved")]


def mixup_draw(mixup: "Mixup") -> tuple[float, bool]:
    """timm's draw of (lam, use_cutmix) for one batch from numpy's global generator: `Mixup.__call__` draws and
    mixes in one step, and each fixed pair of this project needs the draw alone, under the pair's seed."""
    return mixup._params_per_batch()


def dump_checkpoint(trainer: "pl.Trainer", weights_only: bool) -> dict[str, Any]:
    """The checkpoint dict of the current state: `trainer.save_checkpoint` also runs a barrier, which waits forever
    when a stop signal reaches DDP ranks at different batches and rank 0 alone saves last.ckpt."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def batches_done_this_epoch(trainer: "pl.Trainer") -> int:
    """Training batches completed in the current epoch (Lightning's loop progress; no public counter has it)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option name of a (jsonargparse) parser and its subcommands, for "did you mean" hints: argparse keeps
    its actions and subparsers in private members only."""
    names = {action.dest for action in parser._actions if action.dest and action.dest != "help"}
    for sub in subcommand_parsers(parser).values():
        names |= option_names(sub)
    return names


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A (jsonargparse) parser's subcommands by name (`fit`: its parser), {} without: in a private member only."""
    subcommands = getattr(parser, "_subcommands_action", None)
    return dict(subcommands._name_parser_map) if subcommands else {}


def is_local_path(path: str) -> bool:
    """A path on the local file system, not an object store URL (s3://, gs://...), as Lightning decides it (its
    checkpoint I/O treats the two differently; the function is private to lightning_fabric)."""
    from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
    return _is_local_file_protocol(path)


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): torch says so only in private functions
    (`torch.cpu._is_avx512_bf16_supported`, `_is_amx_tile_supported`); False where they are missing."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
                getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@contextmanager
def attention_weights(attention: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the attention weights (B, heads, N, N) a timm `Attention` forms while in the block: timm's fused
    kernel never forms them, so its internal switch (`fused_attn`) is off meanwhile, and the input of its
    dropout (`attn_drop`, the softmax rows) is captured. timm has no public way to read them."""
    captured: list[torch.Tensor] = []
    handle = attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(output))
    fused, attention.fused_attn = attention.fused_attn, False
    try:
        yield captured
    finally:
        attention.fused_attn = fused
        handle.remove()
