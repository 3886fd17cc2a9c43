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
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from timm.data import Mixup

__all__ = ["mixup_draw", "dump_checkpoint", "batches_done_this_epoch", "option_names", "subcommand_parsers", "is_local_path",
           "cpu_computes_bf16", "attention_weights", "Refusal", "record_refusals", "refusals", "nested_option",
           "OVERRIDDEN", "SUBCLASS_ATTRIBUTES"]

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
    # wrapped by record_refusals: the check of a typed option's value, where its name, type and value are at hand
    ("jsonargparse._typehints.ActionTypeHint", "_check_type_"),
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


@dataclass(frozen=True)
class Refusal:
    """A value jsonargparse refused: its option (relative to the parser that checked it: `model.tau`, or `beta` of a
    class's options), the option's type, the value as given, and the option's value before it (a class a
    `--key.option` belongs to)."""
    key: str
    hint: Any
    value: Any
    previous: Any = None


def record_refusals() -> None:
    """Makes the exception jsonargparse raises for a refused value carry it as `.refusal` (a `Refusal`): jsonargparse 4
    names the option, its type and the value in its message text alone. Wraps the check of a typed option once."""
    from jsonargparse._typehints import ActionTypeHint

    check = ActionTypeHint._check_type_
    if getattr(check, "records_refusals", False):
        return

    @functools.wraps(check)
    def checked(action: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return check(action, value, *args, **kwargs)
        except (TypeError, ValueError) as error:
            if not hasattr(error, "refusal"):
                before = kwargs.get("cfg")
                before = before.get(action.dest) if hasattr(before, "get") else None
                error.refusal = Refusal(action.dest, action._typehint, value, before)
            raise

    checked.records_refusals = True  # type: ignore[attr-defined]
    ActionTypeHint._check_type_ = checked


def refusals(error: BaseException | None) -> list[Refusal]:
    """The refusals an exception and the exceptions it was raised from carry, outermost first (a class's option
    after the option that names the class)."""
    found, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(getattr(error, "refusal", None), Refusal):
            found.append(error.refusal)
        error = error.__cause__ or error.__context__
    return found


def nested_option(value: Any) -> tuple[str, Any] | None:
    """(option, value) of jsonargparse's `--key.option value` given to a class option (its `NestedArg`), else None."""
    nested = isinstance(value, tuple) and getattr(value, "_fields", ()) == ("key", "val")
    return (value.key, value.val) if nested else None
