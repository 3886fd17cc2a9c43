"""The machine a server runs on: children that die with their parent, the accelerators here, a free port.

LitServe forks a process manager and an API server and spawns inference workers; a `kill -9` (or the OOM
killer) on the main process must not leave them holding the port and the model's memory.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys

import torch

from distill.common.errors import UserError

__all__ = ["ForkedChildrenDieWithParent", "accelerators_here", "check_port", "die_with_parent", "port_number"]

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


def port_number(text: str) -> int:
    """argparse type: a TCP port LitServe accepts (1024-65535)."""
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1024 to 65535, got '{text}'")
    return int(text)
