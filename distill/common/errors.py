"""The one exception class for bad input: what a user can fix by changing an option, a file or a folder.

The `distill` command prints a `UserError` as one line (`error: ...`, exit code 2); every other
exception is a bug or a library failure nobody translated, and keeps its traceback. Raise it
where input is validated, with the option or file it concerns and what is accepted; when it
translates a library's error, chain that one (`raise UserError(...) from err`) so that
`DISTILL_DEBUG=1` shows both.
"""
from __future__ import annotations

__all__ = ["UsageError", "UserError", "first_line"]


class UserError(Exception):
    """Bad input (an option, a file, a folder, a diverged run): printed as one line by the CLI.

    The message names what is wrong and what is accepted, e.g.
    `data.batch_size 64 is larger than the 40 training images; lower data.batch_size`.
    """


class UsageError(UserError):
    """A command line the parser rejects (an unknown option, a missing one, a value of the wrong type): printed
    with a pointer to `--help` instead of to the traceback, which would only show the parser."""


def first_line(err: BaseException, limit: int = 160, typed: bool = False) -> str:
    """A library error quoted in one of our lines: its message's first line, cut at `limit` characters; its type's
    name when it has no message (`typed`: always `Type: message`)."""
    lines = str(err).strip().splitlines()
    text = lines[0][:limit] if lines else ""
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text}" if typed else text
