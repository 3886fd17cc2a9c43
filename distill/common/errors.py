"""The one exception class for bad input: what a user can fix by changing an option, a file or a folder.

The `distill` command prints a `UserError` as one line (`error: ...`, exit code 2); every other
exception is a bug or a library failure nobody translated, and keeps its traceback. Raise it
where input is validated, with the option or file it concerns and what is accepted; when it
translates a library's error, chain that one (`raise UserError(...) from err`) so that
`DISTILL_DEBUG=1` shows both.
"""
from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineArgumentParser", "UsageError", "UserError", "non_negative_float", "positive_float", "positive_int"]


class UserError(Exception):
    """Bad input (an option, a file, a folder, a diverged run): printed as one line by the CLI.

    The message names what is wrong and what is accepted, e.g.
    `data.batch_size 64 is larger than the 40 training images; lower data.batch_size`.
    """


class UsageError(UserError):
    """A command line the parser rejects (an unknown option, a missing one, a value of the wrong type): printed
    with a pointer to `--help` instead of to the traceback, which would only show the parser."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the commands outside LightningCLI (export, predict, ...): a mistake is a `UserError`
    naming the option, printed by `distill.cli.cli_main` as one line like every other bad input."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}  ({self.prog} --help lists the options)")


def positive_int(text: str) -> int:
    """argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of 1 or more, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number of 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got '{text}'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {value}")
    return value
