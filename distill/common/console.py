"""What a `distill` command writes on the console: the project's own lines and every warning as whole lines;
Lightning's banners left out.

Lightning writes its device banners ("GPU available: False, used: False", "TPU available: ..."), product tips
("Tip: ... litlogger") and notes on what it configured as INFO records of its rank-zero and seed loggers.
`quiet_console` raises those loggers to WARNING (Lightning's warnings and errors still show) and keeps the
`distill` logger at INFO: the project's own lines (the student and teacher, the lr scaling, where a stopped run
was saved) go there, through `say`.

Python prints a warning as `file:line: Category: message` followed by the warning's source line on a line of
its own; a progress bar redrawn between the two leaves the source line bare on the console. Under
`quiet_console` a warning is one line, `Category: message (file.py:line)`, and it and the `distill` logger's lines
are written with `tqdm.write`, which lifts the progress bars off the terminal while it writes (a forked
DataLoader worker writes its line in one piece and leaves the bars alone).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from lightning_utilities.core.rank_zero import rank_zero_only
from tqdm import tqdm

__all__ = ["LOGGER", "QUIETED", "quiet_console", "say"]

LOGGER = "distill"
# Lightning's loggers of INFO lines that are not the user's business: banners, tips, what it configured
QUIETED = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
           "lightning_fabric.utilities.seed", "pytorch_lightning.accelerators.cuda")


@rank_zero_only
def say(message: str) -> None:
    """One line of the project's own on the console (from global rank 0 only; Lightning sets the rank)."""
    logging.getLogger(LOGGER).info(message)


def _write_whole(text: str, stream: TextIO, pid: int) -> None:
    """`text` and a newline in one piece: in process `pid` with `tqdm.write`, which lifts that process's progress bars
    off the terminal while it writes; in a forked child (a DataLoader worker), whose copies of the bars are stale
    and must not be redrawn, in one plain write."""
    if os.getpid() == pid:
        tqdm.write(text, file=stream)
    else:
        stream.write(text + "\n")
        stream.flush()


class _AboveProgressBars(logging.Handler):
    """A handler that writes each record whole, above any progress bar (`_write_whole`)."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_whole(self.format(record), sys.stderr, self.pid)
        except Exception:  # noqa: BLE001 - logging's contract: a failed write is reported, never raised
            self.handleError(record)


def _warning_printer(pid: int) -> Callable[..., None]:
    """A `warnings.showwarning` that prints one line, `Category: message (file.py:line)`, without the source line,
    above any progress bar (`_write_whole`)."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:
        try:
            _write_whole(f"{category.__name__}: {message} ({Path(filename).name}:{lineno})", file or sys.stderr, pid)
        except OSError:  # the console is gone (a closed pipe): a warning is not worth failing for
            pass

    return show


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Within: Lightning's INFO lines off, the project's lines on, warnings as whole lines; restored after (a test
    calling the CLI twice in one process sees the same console both times)."""
    quieted = [logging.getLogger(name) for name in QUIETED]
    levels = [logger.level for logger in quieted]
    own = logging.getLogger(LOGGER)
    own_level, own_propagate, shown = own.level, own.propagate, warnings.showwarning
    handler = None
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    own.setLevel(logging.INFO)
    # as Lightning does: where the root logger has handlers (pytest's, a user's basicConfig), the records go to them
    if not logging.getLogger().hasHandlers() and not own.handlers:
        handler = _AboveProgressBars(os.getpid())
        own.addHandler(handler)
        own.propagate = False
    warnings.showwarning = _warning_printer(os.getpid())
    try:
        yield
    finally:
        warnings.showwarning = shown
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)
        if handler is not None:
            own.removeHandler(handler)
        own.setLevel(own_level)
        own.propagate = own_propagate
