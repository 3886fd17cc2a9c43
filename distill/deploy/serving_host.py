"""The machine a server runs on: children that die with their parent, the accelerators here, a free port.

LitServe forks a process manager and an API server and spawns inference workers; a `kill -9` (or the OOM
killer) on the main process must not leave them holding the port and the model's memory.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

import tempfile
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import restricted_number_type

from distill.common.errors import UserError
from distill.common.files import OutputLock

# a TCP port LitServe accepts (below 1024 needs root)
Port = restricted_number_type("Port", int, [(">=", 1024), ("<=", 65535)])
Host = Literal["127.0.0.1", "0.0.0.0", "::"]

__all__ = ["ForkedChildrenDieWithParent", "accelerators_here", "check_port", "die_with_parent", "listen"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
