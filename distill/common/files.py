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
import errno
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Iterator, Optional

import yaml

from distill.common.errors import UserError, first_line

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; outputs are still written atomically
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputLock", "write_atomically", "replace_folder", "free_bytes", "lock_path", "load_yaml", "make_folder",
           "ENVIRONMENT_ERRORS", "environment_error", "writing", "human_size", "folder_for_outputs"]

# OS errors that are the machine's state, not a bug: a full disk, a read-only or foreign folder, a name too long.
# A command meeting one prints `environment_error`'s line (distill/cli.py), not a traceback.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "free disk space (or write elsewhere) and run the command again",
    errno.EDQUOT: "free space under your disk quota (or write elsewhere) and run the command again",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "you may not write or read there: change its permissions, or write elsewhere",
    errno.EPERM: "you may not write or read there: change its permissions, or write elsewhere",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EFBIG: "the file is larger than this filesystem allows: write elsewhere",
}


def machine_errno(err: BaseException) -> Optional[int]:
    """The errno of an error that is the machine's state (`ENVIRONMENT_ERRORS`): an `OSError`'s, or one a library
    written in Rust reports in its message (safetensors: `I/O error: No space left on device (os error 28)`)."""
    if isinstance(err, OSError):
        return err.errno if err.errno in ENVIRONMENT_ERRORS else None
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found and int(found.group(1)) in ENVIRONMENT_ERRORS else None


def environment_error(err: BaseException) -> Optional[str]:
    """One line for an `OSError` that is the machine's state (`ENVIRONMENT_ERRORS`), naming the path, the cause and
    what to do; None for any other exception (a bug keeps its traceback)."""
    if not isinstance(err, OSError) or err.errno not in ENVIRONMENT_ERRORS:
        return None
    where = f"'{err.filename}'" if err.filename else "a file"
    if err.filename2:
        where += f" -> '{err.filename2}'"
    return f"{where}: {err.strerror or os.strerror(err.errno)}; {ENVIRONMENT_ERRORS[err.errno]}"


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of `output`: a hidden file beside it (`dir/.name.lock`)."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def writing(path: str | os.PathLike, option: str) -> Iterator[None]:
    """Turn an OS error of the machine's state (`ENVIRONMENT_ERRORS`: a full disk, a read-only folder) met while
    writing `path` into a `UserError` naming the option and the path; other errors pass as they are."""
    try:
        yield
    except Exception as err:  # an OSError, or a library's error carrying one (machine_errno)
        number = machine_errno(err)
        if number is None:
            raise
        cause = getattr(err, "strerror", None) or os.strerror(number)
        filename = getattr(err, "filename", None)
        what = f"'{filename}': {cause}" if filename else f"cannot write '{path}' ({cause})"
        raise UserError(f"{option}: {what}; {ENVIRONMENT_ERRORS[number]}") from err


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
        self._created: list[Path] = []  # folders `acquire` made for the lock file, removed on release while empty

    def acquire(self) -> "OutputLock":
        if fcntl is None or self._handle is not None:
            return self
        created = _missing_folders(self.path.parent)
        make_folder(self.path.parent, self.option)
        self._created = created
        try:
            self._handle = self._lock()
        except BaseException:
            self._remove_created()  # refused or failed: nothing of this attempt stays behind
            raise
        OutputLock._held.add(self)
        return self

    def _lock(self) -> IO[str]:
        while True:
            existed = self.path.exists()
            try:
                handle = open(self.path, "a+")  # not truncated before the lock is ours: the holder's line stays readable
            except OSError as err:
                raise UserError(f"{self.option}: cannot create its lock file '{self.path}' "
                                f"({err.strerror or err}); {ENVIRONMENT_ERRORS.get(err.errno, 'write elsewhere')}") from err
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
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        except OSError as err:  # a full disk: the lock file stays only if another writer's was there before
            with contextlib.suppress(OSError):
                handle.close()  # flushes the buffer again, and fails again
            if not existed:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise UserError(f"{self.option}: cannot write its lock file '{self.path}' ({err.strerror or err}); "
                            f"{ENVIRONMENT_ERRORS.get(err.errno, 'write elsewhere')}") from err
        return handle

    def _remove_created(self) -> None:
        """Remove the folders this lock created, innermost first, while they are empty (an output written there
        keeps them)."""
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order, so that nobody locks a file about to vanish)."""
        if self._handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None
            self._remove_created()  # a command that failed before writing its output leaves no empty folder
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
        if backup.is_symlink():  # the target was a link to a folder: the link goes, what it pointed to stays
            backup.unlink()
        else:
            shutil.rmtree(backup, ignore_errors=True)


def make_folder(folder: str | os.PathLike, option: str) -> Path:
    """Create `folder` (and its parents); a `UserError` naming the option if a file is in the way or it cannot be made."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UserError(f"{option}: cannot create folder '{folder}': a file of that name, or of one of its parent "
                        "folders, is in the way") from err
    except OSError as err:
        advice = ENVIRONMENT_ERRORS.get(err.errno, "create it yourself or write elsewhere")
        raise UserError(f"{option}: cannot create folder '{folder}' ({err.strerror or err}); {advice}") from err
    return folder


def _missing_folders(folder: str | os.PathLike) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, outermost first (what creating it makes)."""
    missing, path = [], Path(folder).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def human_size(size: float) -> str:
    """`size` bytes as a reader says it: `512 B`, `3.2 KiB`, `1.50 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.{2 if unit == 'GiB' else 1}f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"


@contextlib.contextmanager
def folder_for_outputs(folder: str | os.PathLike, option: str) -> Iterator[Path]:
    """`make_folder`, for the block that writes into it: if the block fails, the folders made here are removed again
    while empty (a failed command leaves no empty folder behind)."""
    created = _missing_folders(folder)
    made = make_folder(folder, option)
    try:
        yield made
    except BaseException:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                break
        raise


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


class _StrictLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (yaml keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given beside it override it
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' is given twice (first at line {seen[key] + 1}); the first would be "
                    "ignored", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> object:
    """A YAML file's content; a `UserError` naming the file, line and column if it is not readable YAML."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        tabs = " (YAML is indented with spaces, not tabs)" if "'\\t'" in str(err) else ""
        raise UserError(f"{path}: not valid YAML{where}: {err.problem or err}{tabs}") from err
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path}: not a readable YAML file ({first_line(err)})") from err
