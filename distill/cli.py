"""The `distill` command (alias `lightning`, `python -m distill`): one table of commands, and the one place
that prints a user error.

    distill fit --config configs/distill.yaml                                        (distill/commands/fit.py, LightningCLI)
    distill pipeline --config configs/pipeline.yaml                                  (distill/commands/pipeline.py)
    distill compare --config configs/distill.yaml --seeds 5                          (distill/commands/compare.py)
    distill export --ckpt runs/distill/checkpoints/best.ckpt --out exports/student   (distill/commands/export.py)
    distill predict --export exports/student --images photos/ --out predictions.csv  (distill/commands/predict.py)
    distill serve --export exports/student --port 8000                               (distill/commands/serve.py)
    distill cache-teacher --config configs/distill.yaml --epochs 30 --out runs/cache (distill/commands/cache_teacher.py)
    distill report runs/digits [--plot plots/]                                       (distill/commands/report.py)

Each command is a module with a `main(argv)`, imported only when it runs (`distill report` does not
load Lightning). Bad input raises `distill.common.errors.UserError` where it is validated (the parsers
too); `cli_main` prints it as one line `error: ...` with exit code 2 (DISTILL_DEBUG=1 shows the
traceback). Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable

from distill.common.argv import given, is_option
from distill.common.configs import check_config_files
from distill.common.console import quiet_console
from distill.common.errors import UsageError, UserError
from distill.common.files import OutputLock, environment_error
from distill.common.processes import STOPPED

__all__ = ["COMMANDS", "TRAINING", "cli_main", "command_of"]

# Every command, in the order `distill` lists them: name -> (module with a `main(argv)`, imported only when run;
# the line of help). `predict --export` (and `predict --help`) is the export's predict, `predict --config`
# LightningCLI's.
TRAINING = ("fit", "validate", "test", "predict")
COMMANDS = {
    **{name: ("distill.commands.fit", "LightningCLI (also `lightning COMMAND`): --config FILE [--model.* --data.* ...]")
       for name in TRAINING},
    "pipeline": ("distill.commands.pipeline", "teacher -> distillation -> hi-res fine-tune -> export, resumable"),
    "compare": ("distill.commands.compare", "the same student under several distillation methods and seeds: what the teacher adds"),
    "export": ("distill.commands.export", "the student alone: a timm folder, ONNX, TorchScript (and INT8 ONNX), each verified"),
    "predict --export": ("distill.commands.predict", "--export DIR --images FOLDER: top-k classes per image to CSV"),
    "serve": ("distill.commands.serve", "--export DIR: an HTTP endpoint (LitServe, dynamic batching) answering top-k JSON"),
    "cache-teacher": ("distill.commands.cache_teacher", "the teacher's outputs on every augmented view, to train without it"),
    "report": ("distill.commands.report", "a run's (or a pipeline's) figures from its TensorBoard files"),
}

COMMANDS_HELP = "\n".join([
    "usage: distill COMMAND [options]      (distill COMMAND --help lists a command's options)", "",
    "training (LightningCLI; also `lightning COMMAND`):",
    "  fit, validate, test, predict     --config configs/distill.yaml [--model.* --data.* --trainer.* ...]",
    "the project's own:",
    *(f"  {name.split()[0]:15s} {line}" for name, (_, line) in COMMANDS.items() if name not in TRAINING),
])


def command_of(argv: list[str]) -> tuple[str, Callable[[list[str] | None], None]]:
    """The command named by argv and its module's `main`; a name that is not a command is a `UsageError`."""
    typed = argv[0] if argv else ""
    if is_option(typed):
        raise UsageError(f"'{typed}' before the command: options go after it (distill COMMAND [options]; `distill` "
                         "alone lists the commands)")
    if typed not in COMMANDS or " " in typed:
        close = difflib.get_close_matches(typed, [n for n in COMMANDS if " " not in n], n=1)
        raise UsageError(f"'{typed}' is not a command{f'; did you mean {close[0]!r}?' if close else ''}  "
                         "(`distill` alone lists them)")
    name, helps, configured = typed, given(argv, "--help", "-h"), given(argv, "--config", "-c")
    if typed == "predict" and (given(argv, "--export") or helps and not configured):
        name = "predict --export"  # `predict` on an export folder (the common case, so its --help too); with
        # --config and without --export: LightningCLI's predict
    elif typed == "predict" and not helps and (given(argv, "--images") or not configured):
        raise UsageError("predict: give --export DIR --images FOLDER (a folder written by `distill export`), or "
                         "--config FILE --ckpt_path CKPT for LightningCLI's predict on the validation split")
    if name in TRAINING:  # before the module loads torch, Lightning and timm (seconds): a config file that is
        check_config_files(argv[1:])  # missing or not a mapping of options is named at once
    return name, importlib.import_module(COMMANDS[name][0]).main


def _user_error(err: BaseException) -> UserError | None:
    """The `UserError` behind `err`: itself, or one it was explicitly raised from (`raise ... from`), if any.

    Only `__cause__` is followed: an exception raised *while handling* a UserError is a bug of its own.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            return err
        err = err.__cause__
    return None


def _environment_error(err: BaseException) -> str | None:
    """The line for an OS error that is the machine's state (`distill.common.files.ENVIRONMENT_ERRORS`), raised here
    or one an exception was explicitly raised from (a library wrapping it); None otherwise."""
    seen = set()
    while err is not None and id(err) not in seen and not isinstance(err, UserError):
        seen.add(id(err))
        line = environment_error(err)
        if line is not None:
            return line
        err = err.__cause__
    return None


def _one_line(err: BaseException) -> str:
    """The message of `err` in one line; for an error re-raised from a DataLoader worker, the original one."""
    text = str(err).strip()
    if not text:
        return repr(err)
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:  # torch's worker ExceptionWrapper
        last = [line for line in lines if line.strip()][-1].strip()
        name = f"{type(err).__name__}: "
        last = last.removeprefix(name)
        return last.split(": ", 1)[1] if last.startswith("distill.common.errors.UserError: ") else last
    return lines[0]


def _library_error(err: BaseException, module: str, name: str) -> bool:
    """Whether `err` is the exception class `module.name` of a library, without importing the library: a command
    that never loaded Lightning cannot have raised one of its exceptions."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(err, getattr(loaded, name))


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of `distill`, `lightning` and `python -m distill`; tests pass `args`."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or given(argv[:1], "-h", "--help"):
        print(COMMANDS_HELP)
        return
    if given(argv[:1], "--version"):
        print(f"distill {importlib.metadata.version('deit-distill')}")
        return
    name = ""
    try:
        name, main = command_of(argv)
        with quiet_console():  # our lines and whole-line warnings; Lightning's banners and tips left out
            if name in TRAINING:  # LightningCLI: the whole command line (from sys.argv when run from the shell:
                main(None if args is None else argv)  # it warns about `args` otherwise)
            else:
                main(argv[1:])
    except KeyboardInterrupt:
        print("interrupted (Ctrl+C); what was being written was left as it was before", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `distill fit --help | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it
    except SystemExit as err:
        if _library_error(err, "pytorch_lightning.utilities.exceptions", "SIGTERMException"):  # a SystemExit
            # preempted: Lightning stopped after a batch, last.ckpt was saved
            print("stopped by SIGTERM; resume with the same command and --ckpt_path last", file=sys.stderr)
            raise SystemExit(STOPPED) from None  # 128 + SIGTERM, what schedulers expect of a terminated job
        if name in TRAINING and err.code == 1 and isinstance(err.__context__, KeyboardInterrupt):
            # Lightning's own Ctrl+C handling during fit ends in exit(1)
            print("interrupted (Ctrl+C); resume with the same command and --ckpt_path last", file=sys.stderr)
            raise SystemExit(130) from None
        raise
    except Exception as err:  # one line for bad input, tracebacks for bugs
        if isinstance(err.__context__, KeyboardInterrupt) and not os.environ.get("DISTILL_DEBUG"):
            # a second Ctrl+C (a terminal's, `timeout`'s to the process group) cut Lightning's clean-up short, which
            # then failed on its half-stopped loaders: an interruption, not a bug; the first one's save is complete
            print(f"interrupted (Ctrl+C, twice: the clean-up stopped at '{_one_line(err)}'); what was being written "
                  "was left as it was before", file=sys.stderr)
            raise SystemExit(130) from None
        if _library_error(err, "lightning_fabric.utilities.exceptions", "MisconfigurationException"):
            # Lightning's own message for a bad trainer option: translated on purpose
            if os.environ.get("DISTILL_DEBUG"):
                raise
            print(f"error: trainer: {_one_line(err)}  (DISTILL_DEBUG=1 shows the traceback)", file=sys.stderr)
            raise SystemExit(2) from None
        machine = _environment_error(err)
        if machine is not None and not os.environ.get("DISTILL_DEBUG"):  # a full disk, a read-only folder: not a bug
            print(f"error: {name.split()[0] or 'distill'}: {machine}  (DISTILL_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
            raise SystemExit(2) from None
        user_error = _user_error(err)
        if user_error is None or (os.environ.get("DISTILL_DEBUG") and not isinstance(user_error, UsageError)):
            raise  # DISTILL_DEBUG: the traceback of a failed check; a parser's refusal has none worth showing
        hint = "" if isinstance(user_error, UsageError) else "  (DISTILL_DEBUG=1 shows the traceback)"
        print(f"error: {_one_line(user_error)}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        OutputLock.release_all()  # also when a test calls cli_main again in the same process
