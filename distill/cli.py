"""The `distill` command (alias `lightning`): LightningCLI over DistillationModule + ImageDataModule.

    distill fit --config configs/distill.yaml
    distill fit --config configs/distill.yaml --print_config
    distill validate --config configs/distill.yaml --ckpt_path runs/distill/checkpoints/best.ckpt
    distill pipeline --config configs/pipeline.yaml       (distill/pipeline.py)
    distill export --ckpt runs/distill/checkpoints/best.ckpt --out exports/student   (distill/export.py)
    distill predict --export exports/student --images photos/ --out predictions.csv  (distill/predict.py)
    distill report runs/digits [--plot plots/]                                       (distill/report.py)
    distill cache-teacher --config configs/distill.yaml --epochs 30 --top_k 10 --out runs/cache (distill/cache.py)

Shared values are linked, never copied: the data module gives the model its number of
classes, class names, image size and normalisation; the model gives the data module its
label smoothing (folded into mixup targets). Bad input ends with a one-line `error:`
message; set DISTILL_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import yaml
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.callbacks import BestAndLastCheckpoint
from distill.data import ImageDataModule
from distill.module import DistillationModule
from distill.telemetry import DistillationTelemetry
from students.resize import read_student_checkpoint

__all__ = ["DistillCLI", "cli_main", "make_cli"]

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "log_every_n_steps": 10,
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
}


class OneLineErrorParser(LightningArgumentParser):
    """A parser whose errors are one line naming the option (with a close match for a typo), not
    jsonargparse's page of usage; DISTILL_DEBUG=1 restores the full output."""

    argv: list[str] = []  # the command line, set by make_cli: to name the config file a bad key is in

    def error(self, message: str, ex: Optional[Exception] = None) -> None:  # type: ignore[override]
        if not self.exit_on_error or os.environ.get("DISTILL_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        typo = re.search(r"(?:option '|arguments: .*?--)([\w.]+)", text)
        close = difflib.get_close_matches(typo.group(1), sorted(_option_names(self) | _option_names(parser)), n=1) if typo else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        source = _config_with_key(self.argv, typo.group(1)) if typo else None
        if source:
            text = f"{source}: {text}"
        sys.stderr.write(f"error: {text}{hint}  ({parser.prog.replace(' [options]', '')} --help lists the options)\n")
        raise SystemExit(2)


def _config_with_key(argv: list[str], dotted: str) -> Optional[str]:
    """The --config file of `argv` that sets the dotted key, if any."""
    files = [b for a, b in zip(argv, argv[1:]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        try:
            node = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            return name
    return None


def _option_names(parser: LightningArgumentParser) -> set[str]:
    names = {action.dest for action in parser._actions if action.dest and action.dest != "help"}
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in (subcommands._name_parser_map.values() if subcommands else []):
        names |= _option_names(sub)
    return names


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
        # throughput, pictures, HPARAMS (distill/telemetry.py)
        parser.add_lightning_class_args(DistillationTelemetry, "telemetry")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.mean", "model.input_mean")
        parser.link_arguments("data.std", "model.input_std")
        parser.link_arguments("model.label_smoothing", "data.label_smoothing")
        parser.link_arguments("data.teacher_cache", "model.teacher_cache")
        parser.add_argument(
            "--metrics_json", type=Optional[str], default=None,
            help="after fit: validate the best checkpoint and write its metrics, epochs, image size and wall "
                 "time to this JSON file (`distill pipeline` uses it to mark a stage finished)",
        )

    def before_fit(self) -> None:
        self._fit_started = time.monotonic()
        # fail now, not after the first epoch, when an output folder cannot be written
        outputs = {"trainer.default_root_dir": self.trainer.default_root_dir}
        if self.trainer.checkpoint_callback is not None and self.trainer.checkpoint_callback.dirpath:
            outputs["checkpoint.dirpath"] = self.trainer.checkpoint_callback.dirpath
        for logger in self.trainer.loggers:
            if getattr(logger, "save_dir", None):
                outputs["trainer.logger save_dir"] = logger.save_dir
        metrics_json = self.config[self.subcommand].get("metrics_json")
        if metrics_json:
            outputs["metrics_json"] = str(Path(metrics_json).parent)
        for option, folder in outputs.items():  # on every rank: a rank-0-only failure would leave others waiting
            _check_writable(option, folder)

    def _parse_ckpt_path(self) -> None:
        """Read a `--ckpt_path` file with this project's checks first (weights_only, a student checkpoint),
        so that a foreign or crafted file is one clear line; then LightningCLI reads its hparams."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            read_student_checkpoint(path, "ckpt_path")
        super()._parse_ckpt_path()

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


def _check_writable(option: str, folder: str | os.PathLike) -> None:
    """Create `folder` and write a probe file in it; a one-line error names the option otherwise."""
    if "://" in str(folder):  # remote storage (s3://, gs://): checked by its own client
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check"):
            pass
    except OSError as err:
        raise PermissionError(f"{option}: cannot write to '{folder}' ({err.strerror or err}); "
                              "choose a folder you can write to") from err


# What a user can fix: bad values, files, folders; a training run that diverged.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


PROJECT = Path(__file__).resolve().parents[1]


def _user_error(err: BaseException) -> Optional[BaseException]:
    """The bad-input error (ValueError / OSError / non-finite loss) of a chain, if any.

    The outermost one raised by this project's code (its messages name options and files),
    else the innermost one (what a library reported, under its wrappers).
    """
    found = None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, USER_ERRORS):
            if _raised_here(err):
                return err
            found = err
        err = err.__cause__  # explicit `raise ... from`: not an error met while handling another
    return found


def _raised_here(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PROJECT) and \
        "site-packages" not in tb.tb_frame.f_code.co_filename


def _one_line(err: BaseException) -> str:
    """The message of `err` in one line; for an error re-raised from a DataLoader worker, the original one."""
    text = str(err).strip()
    if not text:
        return repr(err)
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:  # torch's worker ExceptionWrapper
        last = [line for line in lines if line.strip()][-1].strip()
        name = f"{type(err).__name__}: "
        return last[len(name):] if last.startswith(name) else last
    return lines[0]


def make_cli(args: Optional[list[str]] = None, run: bool = True) -> DistillCLI:
    """The CLI with this project's defaults; `run=False` only parses and instantiates (tests)."""
    OneLineErrorParser.argv = list(sys.argv[1:] if args is None else args)
    return DistillCLI(
        DistillationModule,
        ImageDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the module builds timm optimiser groups itself
        parser_class=OneLineErrorParser,
    )


def _tool(argv: list[str]) -> Optional[Callable[[list[str]], None]]:
    """The non-Lightning command named by argv, if any."""
    if argv[:1] == ["export"]:
        from distill.export import main
        return main
    if argv[:1] == ["cache-teacher"]:
        from distill.cache import main
        return main
    if argv[:1] == ["report"]:
        from distill.report import main
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
            with warnings.catch_warnings():
                # our data module restores mid-epoch positions itself (see ImageDataModule.state_dict)
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
                make_cli(args)
    except SIGTERMException:  # preempted: Lightning stopped after a batch, last.ckpt was saved
        print("stopped by SIGTERM; resume with the same command and --ckpt_path last", file=sys.stderr)
        raise SystemExit(143) from None  # 128 + SIGTERM, what schedulers expect of a terminated job
    except Exception as err:  # noqa: BLE001 - one line for bad input, tracebacks for bugs
        user_error = _user_error(err)
        if user_error is None or os.environ.get("DISTILL_DEBUG"):
            raise
        print(f"error: {_one_line(user_error)}  (DISTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
