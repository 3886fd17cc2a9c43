"""The `distill` command (alias `lightning`): LightningCLI over DistillationModule + ImageDataModule.

    distill fit --config configs/distill.yaml
    distill fit --config configs/distill.yaml --print_config
    distill validate --config configs/distill.yaml --ckpt_path runs/distill/checkpoints/best.ckpt
    distill pipeline --config configs/pipeline.yaml       (distill/pipeline.py)
    distill export --ckpt runs/distill/checkpoints/best.ckpt --out exports/student   (distill/export.py)
    distill predict --export exports/student --images photos/ --out predictions.csv  (distill/predict.py)

Shared values are linked, never copied: the data module gives the model its number of
classes, class names, image size and normalisation; the model gives the data module its
label smoothing (folded into mixup targets). Bad input ends with a one-line `error:`
message; set DISTILL_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

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
        parser.add_argument(
            "--metrics_json", type=Optional[str], default=None,
            help="after fit: validate the best checkpoint and write its metrics, epochs, image size and wall "
                 "time to this JSON file (`distill pipeline` uses it to mark a stage finished)",
        )

    def before_fit(self) -> None:
        self._fit_started = time.monotonic()

    def after_fit(self) -> None:
        path = self.config[self.subcommand].get("metrics_json")
        if not path:
            return
        wall_time = time.monotonic() - self._fit_started
        best = self.trainer.checkpoint_callback.best_model_path
        self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        if self.trainer.is_global_zero:
            result = {
                "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")},
                "best_checkpoint": best, "epochs": self.trainer.current_epoch,
                "img_size": self.model.hparams.img_size, "wall_time_s": round(wall_time, 1),
            }
            tmp = Path(f"{path}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(path)  # atomic: a stage is finished only once this file exists


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


def _tool(argv: list[str]) -> Optional[Callable[[list[str]], None]]:
    """The non-Lightning command named by argv, if any."""
    if argv[:1] == ["export"]:
        from distill.export import main
        return main
    if argv[:1] == ["pipeline"]:
        from distill.pipeline import main
        return main
    if argv[:1] == ["predict"] and any(a == "--export" or a.startswith("--export=") for a in argv):
        from distill.predict import main  # `predict` on an export folder; without --export: LightningCLI's
        return main
    return None


def cli_main(args: Optional[list[str]] = None) -> None:
    """Entry point of `distill`, `lightning` and `python -m distill`; tests pass `args`."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        tool = _tool(argv)
        if tool is not None:
            tool(argv[1:])
        else:
            make_cli(args)
    except Exception as err:  # noqa: BLE001 - one line for bad input, tracebacks for bugs
        user_error = _user_error(err)
        if user_error is None or os.environ.get("DISTILL_DEBUG"):
            raise
        message = str(user_error).strip().splitlines()[0] if str(user_error).strip() else repr(user_error)
        print(f"error: {message}  (DISTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
