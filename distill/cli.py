"""The `distill` command (alias `lightning`): LightningCLI over DistillationModule + ImageDataModule.

    distill fit --config configs/distill.yaml
    distill fit --config configs/distill.yaml --print_config
    distill validate --config configs/distill.yaml --ckpt_path runs/distill/checkpoints/best.ckpt

Shared values are linked, never copied: the data module gives the model its number of
classes, class names, image size and normalisation; the model gives the data module its
label smoothing (folded into mixup targets). Bad input ends with a one-line `error:`
message; set DISTILL_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from distill.callbacks import BestAndLastCheckpoint
from distill.data import ImageDataModule
from distill.module import DistillationModule

__all__ = ["DistillCLI", "cli_main", "make_cli"]

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "log_every_n_steps": 10,
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class DistillCLI(LightningCLI):
    """LightningCLI with the argument links and default callbacks of a distillation run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # best by validation accuracy of the averaged head, plus last (for --ckpt_path last)
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best",
            "checkpoint.save_last": True,
            "checkpoint.enable_version_counter": False,
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.mean", "model.input_mean")
        parser.link_arguments("data.std", "model.input_std")
        parser.link_arguments("model.label_smoothing", "data.label_smoothing")


def _user_error(err: BaseException) -> Optional[BaseException]:
    """The bad-input error (ValueError / OSError) at the root of a chain, if any."""
    found = None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ValueError, OSError)):
            found = err
        err = err.__cause__ or err.__context__
    return found


def make_cli(args: Optional[list[str]] = None, run: bool = True) -> DistillCLI:
    """The CLI with this project's defaults; `run=False` only parses and instantiates (tests)."""
    return DistillCLI(
        DistillationModule,
        ImageDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds timm optimiser groups itself
    )


def cli_main(args: Optional[list[str]] = None) -> None:
    """Entry point of `distill`, `lightning` and `python -m distill`; tests pass `args`."""
    try:
        make_cli(args)
    except Exception as err:  # noqa: BLE001 - one line for bad input, tracebacks for bugs
        user_error = _user_error(err)
        if user_error is None or os.environ.get("DISTILL_DEBUG"):
            raise
        message = str(user_error).strip().splitlines()[0] if str(user_error).strip() else repr(user_error)
        print(f"error: {message}  (DISTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
