"""Writing outputs without losing anything: one writer at a time, whole files or nothing.

- `OutputLock`: an advisory lock (`fcntl.flock`) on a lock file beside an output. A second
  process writing the same output is refused with the first one's pid, host and start time;
  the kernel releases the lock when its holder dies, however it dies, so a crashed writer
  never leaves it stuck (its file stays, unlocked, until the next writer takes and removes
  it). (Hand-written: the `filelock` package truncates the lock file when it opens it, so the
  holder could not be named.)
- `write_atomically`: a file is written beside its target, flushed to disk and renamed over it;
  on any failure the partial file is removed and the previous file is left as it was.
- `replace_folder`: a folder built beside its target takes the target's place; the previous
  folder is removed only once the new one is in place, and is put back if that fails.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Iterator, Optional

from distill.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; outputs are still written atomically
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputLock", "write_atomically", "replace_folder", "free_bytes", "lock_path"]


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of `output`: a hidden file beside it (`dir/.name.lock`)."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


class OutputLock:
    """Hold `path` (a lock file) while writing an output; a second holder gets a `UserError`.

    Args:
        path: the lock file (created if needed; left in place, unlocked, when released).
        option: what the output is, for the message (e.g. `checkpoint.dirpath 'runs/x'`).
    """

    _held: "set[OutputLock]" = set()  # every lock this process holds: `release_all` when a command ends

    def __init__(self, path: str | os.PathLike, option: str) -> None:
        self.path, self.option = Path(path), option
        self._handle: Optional[IO[str]] = None

    def acquire(self) -> "OutputLock":
        if fcntl is None or self._handle is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")  # not truncated before the lock is ours: the holder's line stays readable
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise UserError(f"{self.option} is being written by {holder}; wait for it to finish, stop it, or "
                                f"write elsewhere (lock file '{self.path}', released when its holder exits)") from None
            try:  # the holder we waited for may have removed the file: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        OutputLock._held.add(self)
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order, so that nobody locks a file about to vanish)."""
        if self._handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None
        OutputLock._held.discard(self)

    @classmethod
    def release_all(cls) -> None:
        """Release every lock of this process (the end of a command, however it ended)."""
        for lock in list(cls._held):
            lock.release()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def write_atomically(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a path beside `path` to write to; on success it is flushed and renamed over `path`.

    On an exception the partial file is removed and `path` is untouched.
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}{suffix}")
    try:
        yield partial
        replace_file(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def replace_file(partial: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush `partial` to disk, then rename it over `path` (atomic: the old file stays whole until then)."""
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def replace_folder(new: Path, target: Path) -> None:
    """Move the folder `new` to `target`; an existing target is set aside first and removed only after.

    If moving `new` into place fails, the previous target is put back.
    """
    backup = target.with_name(f".{target.name}.old{os.getpid()}")
    had_target = target.exists()
    if had_target:
        os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        if had_target:
            os.replace(backup, target)
        raise
    if had_target:
        shutil.rmtree(backup, ignore_errors=True)


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free
