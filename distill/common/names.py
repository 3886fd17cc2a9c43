"""A name is a path: the one rule for a name given in a config that becomes a folder or file name.

A pipeline's `name` (`<root>/<name>/`), a stage's `name` (`<root>/<name>/<stage>/`), a logger
`version` a pipeline stage is given: each is joined to a folder the command owns, so `../x`, `/tmp/x`,
`a/b`, `.` or an empty name would write elsewhere or into the folder itself. `check_name` accepts
one portable folder name and refuses anything else in one line, before anything is written:

- letters, digits, `_`, `-` and `.`, ASCII only, the first a letter, digit or `_` (no hidden
  `.name`, no `.`/`..`, nothing that reads as an option), 1 to `MAX_LENGTH` characters;
- not a name the owner keeps for its own files (`reserved`), in any case: on a case-insensitive
  filesystem (macOS, Windows) `Export` is the folder `export`. `same_folder` tells two names
  apart the same way.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from distill.common.digests import folder_digest
from distill.common.errors import UserError

__all__ = ["MAX_LENGTH", "ACCEPTED", "DIGITS", "check_name", "data_folder_name", "same_folder"]

DIGITS = "digits"  # data.dataset's bundled digits (distill/data/sources.py; not imported: it loads torch)

MAX_LENGTH = 64
ACCEPTED = f"letters, digits, '_', and after the first character '-' and '.', 1 to {MAX_LENGTH} characters"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CHARACTER = re.compile(r"[A-Za-z0-9_.-]")


def check_name(value: object, option: str, reserved: Mapping[str, str] | None = None) -> str:
    """`value` if it is a usable folder name, else a `UserError` naming `option`, the value and what is accepted.

    Args:
        value: the name as read from the file (anything YAML gives: a number, null, text).
        option: where it was given, for the message (`pipeline 'p.yaml': stages[2].name`).
        reserved: names taken by the owner's own files -> what takes them (compared ignoring case).
    """
    if isinstance(value, str) and len(value) <= MAX_LENGTH and _NAME.fullmatch(value):
        taken = next((what for name, what in (reserved or {}).items() if same_folder(name, value)), None)
        if taken is None:
            return value
        reason = f"is taken by {taken}; choose another name"
    else:
        reason = f"{_why_not(value)}; a name becomes one folder or file name, never a path (accepted: {ACCEPTED})"
    shown = repr(value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "...")
    raise UserError(f"{option} {shown} {reason}")


def same_folder(a: str, b: str) -> bool:
    """Whether two names are one folder on a case-insensitive filesystem (`Teacher` and `teacher`)."""
    return a.casefold() == b.casefold()


def _why_not(value: object) -> str:
    if value is None or value == "":
        return "is empty"
    if isinstance(value, (bool, int, float)):  # YAML reads `name: 48` as a number and `name: yes` as true
        return f"is not text ({'true/false' if isinstance(value, bool) else 'a number'}; quote it)"
    if not isinstance(value, str):
        return f"is not text (a {type(value).__name__})"
    if len(value) > MAX_LENGTH:
        return f"is {len(value)} characters long"
    if "/" in value or "\\" in value:
        return "holds a path separator"
    if value.startswith("."):
        return "starts with '.'"  # the folder itself, its parent, or a hidden one
    if value[0] == "-":
        return "starts with '-'"  # it would read as an option
    return f"holds {next(c for c in value if not _CHARACTER.fullmatch(c))!r}"


def data_folder_name(dataset: str) -> str:
    """The folder a run on `dataset` is named after: `<folder name>-<8 hex digits of its content>` (another dataset,
    or the same folder after its images changed, never shares it); the bundled digits are `digits`."""
    if dataset == DIGITS:
        return DIGITS
    folder = Path(dataset)
    if not folder.is_dir():
        raise UserError(f"pipeline --data.dataset: '{dataset}' is not a folder; give a folder with train/ and val/ "
                        "class folders (or a Hugging Face dataset folder)")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.resolve().name).lstrip(".-")[:40] or "data"
    return f"{stem}-{folder_digest(folder)[7:15]}"
