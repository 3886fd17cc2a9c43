"""The machine a server runs on: how many inference processes it holds, children that die with their parent and
stop on SIGTERM, the accelerators here, a free port.

LitServe forks a process manager and an API server and spawns inference workers; a `kill -9` (or the OOM
killer) on the main process must not leave them holding the port and the model's memory, and a SIGTERM at any
moment (start-up included) must stop them all within seconds, without a traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.context import SpawnProcess
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from distill.common.errors import UserError
from distill.common.files import OutputLock
from distill.common.ranges import Port

Host = Literal["127.0.0.1", "0.0.0.0", "::"]

__all__ = ["ForkedChildrenDieWithParent", "StopOnSignal", "accelerators_here", "check_port", "ctrl_c_blocked",
           "die_with_parent", "exit_quietly", "listen", "memory_available", "stop_children", "workers_bound",
           "PROCESS_MEMORY"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PROCESS_MEMORY = 768 << 20
"""Bytes an inference process takes besides its weights, with the API server LitServe starts for it: 0.75 GiB
(measured on CPU, litserve 0.2.19, torch 2.x, a 0.1 MB model: 0.55 GiB for Python, torch, timm and LitServe in the
inference process, 0.15 GiB for the forked API server; each further --workers took 0.6 GiB of MemAvailable)."""


def workers_bound(cores: int, memory: int, per_process: int) -> int:
    """One inference process a core at most (more only take turns), each within the memory available; at least 1."""
    return max(1, min(cores, memory // per_process))


def memory_available() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, less where a cgroup (a container) limits it
    lower; the physical memory where neither can be read (not Linux)."""
    found = []
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        found += [int(line.split()[1]) << 10 for line in meminfo.read_text().splitlines()
                  if line.startswith("MemAvailable:")]
    cgroup = Path("/sys/fs/cgroup")
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2 ("max": no limit), v1 (a huge number)
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            found.append(int((cgroup / limit).read_text()) - int((cgroup / usage).read_text()))
        except (OSError, ValueError):
            continue
    if found:
        return max(0, min(found))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no bound from memory
        return 1 << 60


def accelerators_here() -> dict[str, str]:
    """The accelerators torch can use on this machine, each with what it has: {"cpu": "16 cores", "cuda": ...}."""
    found = {"cpu": f"{os.cpu_count() or 1} cores"}
    if torch.cuda.is_available():
        found["cuda"] = f"{torch.cuda.device_count()} GPU(s)"
    if torch.backends.mps.is_available():
        found["mps"] = "Apple GPU"
    return found


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux `PR_SET_PDEATHSIG`), and
    end now if `parent` has already gone (then no signal would come). Elsewhere a no-op.

    The thread, not the process: LitServe starts the inference processes from its main thread, and restarts a
    dead one from its worker-monitoring thread, which runs until the server shuts down. SIGKILL, because an
    orphan has nobody left to answer and its API server's graceful shutdown would keep the port for 30 s."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


class ForkedChildrenDieWithParent:
    """`os.register_at_fork` hooks: each process forked from here on dies with the process that forked it."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def before(self) -> None:
        self.parent = os.getpid()  # the forking process (a child forking a grandchild is its parent)

    def after_in_child(self) -> None:
        die_with_parent(self.parent)


@contextmanager
def ctrl_c_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread, and delivered when the block ends: a process started meanwhile inherits the
    block, so Ctrl+C, which reaches every process of the terminal's group, never interrupts its start (the import of
    torch, a traceback) and leaves it to the main process to stop (no-op where threads have no signal mask)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    resource_tracker.ensure_running()  # else the first spawn starts it, and unblocks SIGINT as it does
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_quietly(signum: int, frame: Any) -> None:
    """A signal handler: end this process at once, with no traceback (an inference process stopped while it loads the
    model would otherwise print LitServe's start-up), no cleanup (it holds nothing another process reads)."""
    os._exit(128 + signum)


def stop_children(children: list[BaseProcess], seconds: float = 3.0) -> None:
    """Stop `children` (processes multiprocessing started from this one) within about `seconds`, with no traceback:
    SIGTERM to the spawned ones (the inference processes, which exit at once: `exit_quietly`), then SIGKILL to what is
    left, the forked process manager among them (it ignores SIGTERM: stopped before the processes that talk to it, it
    would make them fail with tracebacks)."""
    spawned = [child for child in children if isinstance(child, SpawnProcess)]
    for child in spawned:
        child.terminate()
    deadline = time.monotonic() + seconds
    for child in spawned:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)


def child_pids() -> set[int]:
    """Every process whose parent is this one (from /proc; multiprocessing's list alone where there is none): also one
    forked a moment ago, which multiprocessing lists only once `Process.start` has returned."""
    found = {child.pid for child in multiprocessing.active_children() if child.pid}
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                found.add(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return found


class StopOnSignal:
    """`with StopOnSignal():` SIGTERM and SIGINT (Ctrl+C) stop the server and every process it started, at any moment,
    start-up included, with no traceback; the previous handlers are back after the block.

    The first signal raises KeyboardInterrupt in the main thread. Serving, LitServe catches it and shuts down in order
    (API servers, inference processes, process manager); starting, it leaves `LitServer.run`, the block's end stops
    the children (`stop_children`) and swallows it. Whatever the main thread is doing, a watchdog thread kills the
    children and ends the process `grace` seconds after the first signal, at a second one, or at once when the
    KeyboardInterrupt was lost (raised where Python only reports an exception: an at-fork hook of a fork LitServe is
    making). The processes forked from this one inherit the handler and ignore the signal: the main process stops
    them, in order.
    """

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self.signum: Optional[int] = None  # the signal that stopped the server
        self.main, self.previous, self.unraisable = os.getpid(), {}, sys.unraisablehook
        self.before: set[BaseProcess] = set()  # the children this process had before the block: not the block's to stop
        self.asked, self.hurry, self.done = threading.Event(), threading.Event(), threading.Event()

    @property
    def stopped_by(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> "StopOnSignal":
        self.main, self.before = os.getpid(), set(multiprocessing.active_children())
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.unraisable, sys.unraisablehook = sys.unraisablehook, self._lost
        threading.Thread(target=self._watch, name="stop-on-signal", daemon=True).start()
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], traceback: Any) -> bool:
        try:
            # the processes started in the block; none is left where LitServe shut down in order
            stop_children([child for child in multiprocessing.active_children() if child not in self.before])
        finally:
            self.done.set()
            self.asked.set()  # the watchdog returns
            self.hurry.set()
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            sys.unraisablehook = self.unraisable
        return kind is KeyboardInterrupt and self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.main:
            return  # a process LitServe forked from this one (its manager, an API server): stopped in order, from here
        if self.signum is None and _starting_a_process(frame):
            # raised now, it would cut the start-up data multiprocessing is writing to a new process, which would
            # then fail reading it with a traceback: the signal is sent again a moment later, once that is written
            threading.Timer(0.05, os.kill, (self.main, signum)).start()
            return
        if self.signum is not None:
            self.hurry.set()  # a second signal: stop now
            return
        self.signum = signum
        self.asked.set()
        raise KeyboardInterrupt

    def _lost(self, unraisable: Any) -> None:
        if unraisable.exc_type is KeyboardInterrupt and self.signum is not None:
            self.hurry.set()  # the signal's KeyboardInterrupt, reported instead of raised: stop now, with no traceback
            return
        self.unraisable(unraisable)

    def _watch(self) -> None:
        self.asked.wait()
        self.hurry.wait(self.grace)
        if self.done.is_set():
            return
        for pid in child_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(f"server stopped ({self.stopped_by}; the processes still running were killed)", flush=True)
        os._exit(0)


_LAUNCHERS = ("popen_spawn_posix.py", "popen_forkserver.py")  # multiprocessing's writers of a child's start-up data


def _starting_a_process(frame: Any) -> bool:
    """Whether the interrupted code is multiprocessing handing a new spawned process its start-up data."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.parent.name == "multiprocessing" and path.name in _LAUNCHERS:
            return True
        frame = frame.f_back
    return False


def check_port(host: str, port: int) -> None:
    """A one-line error for a port that cannot be bound (in use, or reserved), before any process starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"serve --port {port}: cannot listen on {host}:{port} ({err.strerror}); "
                            "stop what uses it or choose another --port") from err


def listen(host: Host = "127.0.0.1", port: Port = 8000) -> OutputLock:
    """Claim the address a server will listen on, before it loads a model: a port in use is one line now, and a
    second `distill serve` on the same port, started while the first loads, is refused (the returned lock is held
    until this process ends).

    Args:
        host: address to bind: loopback (the default), or every IPv4 / IPv6 interface
        port: TCP port
    """
    check_port(host, port)
    # LitServe binds the port only after its workers have loaded the model: a second `distill serve` on the same
    # port started meanwhile would pass the check above and then wait forever for a socket it cannot have
    try:
        return OutputLock(Path(tempfile.gettempdir()) / f"distill-serve-port-{port}.lock", f"port {port}").acquire()
    except UserError as err:
        raise UserError(f"serve --port {port}: another distill serve is starting or serving on port {port} "
                        "(stop it or choose another --port)") from err
