"""The LightningCLI of `distill fit / validate / test / predict`: DistillationModule + ImageDataModule, wired.

    distill fit --config configs/distill.yaml
    distill fit --config configs/distill.yaml --print_config
    distill validate --config configs/distill.yaml --ckpt_path runs/distill/checkpoints/best.ckpt

Shared values are linked, never copied: the data module gives the model its number of
classes, class names, image size and normalisation; the model gives the data module its
label smoothing (folded into mixup targets).

Parse errors and failed checks raise `distill.common.errors.UserError`, which `distill.cli` prints
as one line.

Outputs: `fit` never replaces what an earlier run wrote. A checkpoint folder that holds an
earlier run's checkpoints is refused unless the run resumes it (`--ckpt_path last`), and a
second `fit` writing into the same folder while the first runs is refused (a lock released
when its holder exits, however it exits).
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar, Optional

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_warn

from distill.common.adapters import option_names, record_refusals, refusals, subcommand_parsers
from distill.common.argv import given, pairs
from distill.common.checkpoints import read_student_checkpoint
from distill.common.configs import check_config_files, config_with_key
from distill.common.console import say
from distill.common.errors import UsageError, UserError
from distill.common.files import OutputLock, write_atomically
from distill.common.identity import options_identity
from distill.training.datamodule import ImageDataModule
from distill.training.callbacks import BestAndLastCheckpoint, StallAlarm
from distill.training.module import DistillationModule
from distill.training.methods import needs_teacher
from distill.training.option_messages import describe, one_line, unknown_key, unknown_token
from distill.training.run_checks import check_batch_norm_batch, check_monitor, check_trainer_options, check_writable
from distill.training.run_records import (
    nothing_to_resume,
    refuse_earlier_run,
    RecordRunOptions,
    RemoveUnusedOutputs,
    SaveConfigBesideRun,
    last_checkpoint,
    refuse_changed_options,
    refuse_overridden,
)
from distill.training.summary import FitClock, ValidationHistory, fit_summary
from distill.training.telemetry import DistillationTelemetry

__all__ = ["DistillCLI", "fit_options", "make_cli"]

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "log_every_n_steps": 10,
    # Lightning's table of the module's children (loss, metrics, ...): `Student:` / `Teacher:` lines say what
    # counts; a config or --trainer.enable_model_summary true brings the table back
    "enable_model_summary": False,
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
}


class OneLineErrorParser(LightningArgumentParser):
    """A parser whose errors are one `UsageError` line naming the option (a close match for a typo, the range of a
    number out of it; distill/training/option_messages.py), not a page of usage; DISTILL_DEBUG=1 shows the page."""

    argv: ClassVar[list[str]] = []  # the command line, set by make_cli: to name the config file a bad key is in

    def validate(self, cfg: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        try:
            super().validate(cfg, *args, **kwargs)
        except KeyError as error:  # a key no option takes: jsonargparse names it in its text alone
            error.unknown_option = unknown_key(cfg.keys(), self)  # type: ignore[attr-defined]
            raise

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        if not self.exit_on_error or os.environ.get("DISTILL_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        chosen = next((name for name in self.argv if name in subcommand_parsers(self)), None)  # `fit`, as typed
        if parser is self and chosen:  # the root parser refusing the subcommand's options: said in its words
            parser = subcommand_parsers(self)[chosen]
        typo = getattr(ex, "unknown_option", None)
        token = unknown_token(self.argv, self) if ex is None else None  # jsonargparse's unrecognized arguments
        if token:
            typo, text = token[0], f"unknown option{'s' if len(token[1]) > 1 else ''} {', '.join(token[1])}"
        else:
            text = f"unknown option '{typo}'" if typo else describe(refusals(ex)) or one_line(message)
        close = difflib.get_close_matches(typo, sorted(option_names(self) | option_names(parser)), n=1) if typo else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        source = config_with_key(self.argv, typo) if typo else None
        raise UsageError(f"{f'{source}: ' if source else ''}{text}{hint}  ({parser.prog.replace(' [options]', '')} "
                         "--help lists the options)")


def _check_ensemble_options(config: Any, argv: list[str]) -> None:
    """`--model.teacher.init_args.X` on a config whose model.teacher is a list changes its last member alone (as
    jsonargparse applies it): refused, unless the command line gives the teacher (or the list) whole."""
    teacher = (config.get("model") or {}).get("teacher")
    member_options = [name for name, _ in pairs(argv, "--model.teacher.")]
    if not isinstance(teacher, list) or len(teacher) < 2 or not member_options or given(argv, "--model.teacher"):
        return
    source = config_with_key(argv, "model.teacher", last=True) or "the config"
    raise UserError(f"{member_options[0]} would change the last teacher of the ensemble of {len(teacher)} in "
                    f"{source} alone; edit the list in that file (or give --model.teacher with the whole list)")


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
        # throughput, pictures, HPARAMS (distill/training/telemetry.py)
        parser.add_lightning_class_args(DistillationTelemetry, "telemetry")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.mean", "model.input_mean")
        parser.link_arguments("data.std", "model.input_std")
        parser.link_arguments("model.label_smoothing", "data.label_smoothing")
        parser.link_arguments("data.teacher_cache", "model.teacher_cache")
        parser.add_argument(
            "--metrics_json", type=Optional[str], default=None,  # noqa: UP045 - a runtime type for jsonargparse
            help="after fit: validate the best checkpoint and write its metrics, epochs, image size and wall "
                 "time to this JSON file (`distill pipeline` uses it to mark a stage finished); after validate or "
                 "test, given on the command line: the metrics measured (a run's saved config names its fit's "
                 "result file, which they leave alone)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing, then the checks Lightning leaves to a ZeroDivisionError or a traceback later."""
        super().parse_arguments(parser, args)
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        check_trainer_options(config)
        _check_ensemble_options(config, OneLineErrorParser.argv)

    def before_instantiate_classes(self) -> None:
        """`none` runs no teacher: its model.teacher (the recipe's) is not built, so its weights need not exist."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("model") is not None and not needs_teacher(config.model.get("distillation")):
            config.model.teacher = None

    def before_validate(self) -> None:
        if not self.config[self.subcommand].get("ckpt_path"):
            rank_zero_warn("validate without --ckpt_path measures the model as initialised (random weights); give "
                           "--ckpt_path runs/.../best.ckpt to measure a trained one")

    def after_validate(self) -> None:
        self._write_measured("val/")

    def after_test(self) -> None:
        self._write_measured("test/")

    def _write_measured(self, prefix: str) -> None:
        """validate / test with --metrics_json on the command line: what they measured, written whole by rank 0. A
        run's saved config names its fit's result file there, which a validate of that config leaves alone."""
        path = self.config[self.subcommand].get("metrics_json")
        if path and given(OneLineErrorParser.argv, "--metrics_json") and self.trainer.is_global_zero:
            measured = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(prefix)}
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with write_atomically(path) as partial:
                partial.write_text(json.dumps(measured, indent=2))

    def before_fit(self) -> None:
        self._clock = FitClock()
        self.trainer.callbacks.append(self._clock)  # the run's wall time, across resumes
        self.trainer.callbacks.append(RecordRunOptions(getattr(self, "run_options", {})))
        self.trainer.callbacks.append(ValidationHistory())  # for the summary printed after the fit
        self.trainer.callbacks.append(StallAlarm())  # a run still at chance is named while it runs
        # fail now, not after the first epoch, when an output folder cannot be written
        outputs = {"trainer.default_root_dir": self.trainer.default_root_dir}
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath:
            outputs["checkpoint.dirpath"] = checkpoint.dirpath
        for logger in self.trainer.loggers:
            if getattr(logger, "save_dir", None):
                outputs["trainer.logger save_dir"] = logger.save_dir
        metrics_json = self.config[self.subcommand].get("metrics_json")
        if metrics_json:
            if Path(metrics_json).is_dir():
                raise UserError(f"metrics_json: '{metrics_json}' is a folder; give the path of a .json file to write")
            outputs["metrics_json"] = str(Path(metrics_json).parent)
        if self.trainer.loggers:  # without a logger the checkpoint folder holds the config (SaveConfigBesideRun)
            del outputs["trainer.default_root_dir"]  # nothing is written there: no `runs/` made in the current folder
        for option, folder in outputs.items():  # on every rank: a rank-0-only failure would leave others waiting
            check_writable(option, folder)
        if checkpoint is not None:
            check_monitor(checkpoint.monitor, self.model)
        check_batch_norm_batch(self.datamodule.batch_size, self.model)
        leaves = [folder for option, folder in outputs.items() if option != "trainer.logger save_dir"]
        leaves += [logger.log_dir for logger in self.trainer.loggers if getattr(logger, "log_dir", None)]
        self._unused = RemoveUnusedOutputs(leaves)  # taken before anything is written
        self.trainer.callbacks.append(self._unused)
        # rank 0 decides (under DDP the other ranks are started after it, or wait for it in the first collective)
        if self.trainer.is_global_zero and checkpoint is not None and checkpoint.dirpath and "://" not in str(checkpoint.dirpath):
            self._output_lock = self._unused.lock = OutputLock(Path(checkpoint.dirpath) / ".lock",
                                                               f"checkpoint.dirpath '{checkpoint.dirpath}'").acquire()
            try:
                refuse_earlier_run(Path(checkpoint.dirpath), self.config[self.subcommand].get("ckpt_path"),
                                    metrics_json)
            except UserError:
                self._unused.remove()  # the lock made the folder: a refused run leaves none
                raise

    def _parse_ckpt_path(self) -> None:
        """Read a `--ckpt_path` file with this project's checks first (weights_only, a student checkpoint),
        so that a foreign or crafted file is one clear line; then LightningCLI reads its hparams."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path in ("best", "hpc", "registry"):
            raise UserError(f"ckpt_path: '{path}' is not supported here; give 'last' (the checkpoint folder's "
                            "last.ckpt) or the path of a .ckpt file")
        config = self.config[subcommand] if subcommand else None
        if subcommand == "fit":  # what this run is made from, before LightningCLI lays a checkpoint's values over it
            self.run_options = options_identity(config.as_dict())
        resolved = last_checkpoint(config) if path == "last" else path
        if path == "last" and resolved is None:  # Lightning would warn and start afresh, over the folder's results
            raise UserError(nothing_to_resume(config, subcommand == "fit"))
        if resolved and "://" not in str(resolved):
            checkpoint = read_student_checkpoint(resolved, "ckpt_path")  # also: a path that does not exist is one line
            if subcommand == "fit" and isinstance(checkpoint.get("run_options"), dict):
                refuse_changed_options(checkpoint["run_options"], self.run_options, path, resolved)
            else:  # another command evaluates the checkpoint; or a checkpoint of an earlier version of this project
                refuse_overridden(OneLineErrorParser.argv, checkpoint.get("hyper_parameters") or {}, subcommand, path)
            if subcommand == "fit":  # in place of Lightning's "Restoring states from ..." (distill/common/console.py)
                say(f"Resuming from '{resolved}' (step {checkpoint.get('global_step', '?')})")
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.global_step == 0:  # nothing trained: not a finished run (the pipeline must not skip it)
            if trainer.is_global_zero:
                self._unused.remove()
            raise UserError(
                f"fit: the run took no optimiser step ({trainer.num_training_batches} training batches per epoch, "
                f"trainer.max_epochs={trainer.max_epochs}, trainer.max_steps={trainer.max_steps}, "
                f"trainer.limit_train_batches={trainer.limit_train_batches}); nothing was trained, so no result is "
                "written: check data.batch_size against the training set and the trainer limits")
        path = self.config[self.subcommand].get("metrics_json")
        if path:
            self._write_metrics(path)
        lock = getattr(self, "_output_lock", None)
        if lock is not None:
            lock.release()
        if trainer.is_global_zero:  # the run's last lines: figures, checkpoints, what to run next (unless a driver
            print(fit_summary(trainer, next_step=not path), flush=True)  # that asked for metrics_json runs it)

    def _write_metrics(self, path: str) -> None:
        """The final epoch's and the best checkpoint's validation metrics (a pipeline stage's "finished" mark)."""
        wall_time = self._clock.seconds()
        final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        best = self.trainer.checkpoint_callback.best_model_path
        loggers, self.trainer.loggers = self.trainer.loggers, []  # not a point on the curves: `distill report`'s
        try:                                                          # final figure is the last epoch's
            # no validation ran in this process: resumed from a save after the last step (an earlier version's)
            if not final and self.trainer.limit_val_batches:
                self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
                final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
            self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        finally:
            self.trainer.loggers = loggers
        if self.trainer.is_global_zero:
            result = {
                "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")},
                "final_metrics": final, "best_checkpoint": best, "epochs": self.trainer.current_epoch,
                "steps": self.trainer.global_step, "img_size": self.model.hparams.img_size,
                "num_classes": self.model.hparams.num_classes,
                "wall_time_s": round(wall_time, 1),
            }
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with write_atomically(path) as partial:  # a stage is finished only once this file exists
                partial.write_text(json.dumps(result, indent=2))


def make_cli(args: list[str] | None = None, run: bool = True, prog: str = "distill",
             cli_class: type[DistillCLI] = DistillCLI) -> DistillCLI:
    """The CLI with this project's defaults; `run=False` only parses and instantiates (tests, cache-teacher).
    `prog` names the command in error hints (`python -m distill` would otherwise say `__main__.py`)."""
    OneLineErrorParser.argv = list(sys.argv[1:] if args is None else args)
    check_config_files(OneLineErrorParser.argv)  # distill.cli checked them already; make_cli may be called alone
    record_refusals()  # a refused value's option, type and value, for its one-line error
    return cli_class(
        DistillationModule,
        ImageDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigBesideRun,
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own folder's config.yaml
        auto_configure_optimizers=False,  # the module builds timm optimiser groups itself
        parser_class=OneLineErrorParser,
        parser_kwargs={"prog": prog},
    )


class _Parsed(Exception):
    """Ends a `fit_options` parse before anything is built, carrying the options the run would record."""


class _ParseOnly(DistillCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.run_options, self.config[self.subcommand].as_dict())


def fit_options(args: list[str], driver: str, as_given: bool = False) -> dict[str, Any]:
    """The options `distill fit ARGS` would record in its checkpoints (`options_identity` of what jsonargparse
    resolves: config files merged in order, overrides applied, defaults filled in), from the fit command's own parser
    and its checks, with nothing built: what pipeline and compare compare a run folder's record with. A mistake in
    ARGS is the one-line error `distill fit` would give, after `driver` (the command that asks: `compare`).
    ARGS must not resume (`--ckpt_path`). `as_given`: the resolved config itself, nested, its files by path."""
    seed_log = logging.getLogger("lightning_fabric.utilities.seed")  # "Seed set to 0": no seed is used here
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    # LightningCLI seeds before building: its PL_GLOBAL_SEED would reach the driver's children (a run with
    # seed_everything false would take another run's seed), so the environment is left as it was found
    seeded = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        with warnings.catch_warnings():  # the driver's own command line is in sys.argv, not a mistake
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            make_cli(["fit", *args], cli_class=_ParseOnly)
    except _Parsed as parsed:
        return parsed.args[1] if as_given else parsed.args[0]
    except UserError as err:  # UsageError too
        raise type(err)(f"{driver}: its distill fit options: {err}") from err
    finally:
        seed_log.setLevel(level)
        for name, value in seeded.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    raise AssertionError("DistillCLI built its classes before before_instantiate_classes")
