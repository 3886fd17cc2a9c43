"""The one rule for a command stopped by SIGTERM (a scheduler's preemption, `kill`, `docker stop`): it stops like
Ctrl+C, through its `finally` blocks (a half-built folder removed, a table not written), and the child processes
it started stop with it, each first saving what it does on SIGTERM (a `distill fit` its last.ckpt).

    with stop_on_sigterm() as children:          # distill export: no children, the clean-up alone
        code = children.start(command).wait()    # distill pipeline, distill compare: their `distill fit` runs

Written here because the standard library has the pieces, not the rule: `subprocess` does not stop its children
when the parent is stopped, and Python's default SIGTERM ends a process without running its `finally` blocks.
"""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["STOPPED", "Children", "stop_on_sigterm"]

STOPPED = 143  # the exit status of a process stopped by SIGTERM (128 + 15), as `distill fit` and shells report it


class Children:
    """The processes started in a `stop_on_sigterm()` block; those still running when it is left early (SIGTERM,
    an error) get SIGTERM and are waited for. On Ctrl+C, which a terminal sends to them too, they have `GRACE_S`
    to stop by themselves (a SIGTERM on top would cut a `distill fit` saving its checkpoint short), then get SIGTERM:
    an interrupt that reached this process alone (a notebook, `kill -INT`) does not wait for their whole training."""

    GRACE_S = 10.0

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.starting = False  # a SIGTERM while a child is being started waits for it to exist, then stops it
        self.pending = False
        self.stopping = False

    def start(self, command: list[str], **popen: Any) -> subprocess.Popen:
        self.starting = True
        try:
            process = subprocess.Popen(command, **popen)
            self.started.append(process)
        finally:
            self.starting = False
        if self.pending:
            raise SystemExit(STOPPED)
        return process

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.starting:
            self.pending = True
        elif not self.stopping:  # a second SIGTERM while the children stop does not cut their wait short
            raise SystemExit(STOPPED)

    def _stop(self, interrupted: bool) -> None:
        self.stopping = True
        running = [process for process in self.started if process.poll() is None]
        deadline = time.monotonic() + (self.GRACE_S if interrupted else 0.0)
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in running:
            if process.poll() is None:
                process.terminate()
        for process in running:
            process.wait()


@contextmanager
def stop_on_sigterm() -> Iterator[Children]:
    """In the block, SIGTERM raises `SystemExit(143)`; on leaving it early, the children started in it are stopped."""
    children = Children()
    previous = signal.signal(signal.SIGTERM, children._on_sigterm)
    try:
        yield children
    except BaseException as stopped:
        children.stopping = True  # first: a SIGTERM from here on does not cut the stop short
        children._stop(interrupted=isinstance(stopped, KeyboardInterrupt))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
