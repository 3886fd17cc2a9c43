"""A data folder by its content: every file's relative path, size and sha256, hashed once and remembered.

    folder_digest("data/letters")   # 'sha256:...' of (path, size, sha256) of every non-hidden file under it

A dataset option (`data.dataset`) and a teacher cache's fingerprint count a folder by what its files hold, so
a folder regenerated with another seed, two images swapped between classes or an image added to a class
is other data, while a copy of the folder elsewhere is the same data.

Each file's sha256 is remembered beside its size, modification time and inode in
`$XDG_CACHE_HOME/deit-distill/digests/` (default `~/.cache`), one file per folder, as git's index does:
a file whose size, time or inode changed is read again; the others are not. So the first command on a
folder reads it whole (docs/reliability.md gives the cost), the next ones only list it. Files are hashed
by a few threads (hashlib releases the GIL). Hand-written: neither timm nor torchvision fingerprints a folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

__all__ = ["file_digests", "folder_digest", "listed_files"]

_CHUNK = 1 << 20
_THREADS = 4


def listed_files(root: Path) -> list[Path]:
    """Every regular file under `root` (relative paths, sorted), hidden files and folders left out as training leaves
    them out; symbolic links followed once, a broken one left out (training skips it as unreadable)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: each real folder once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, name).relative_to(root) for name in files  # regular files: a broken link or a FIFO
                  if not name.startswith(".") and os.path.isfile(os.path.join(folder, name))]  # holds no data
    return sorted(found)


def folder_digest(root: str | os.PathLike) -> str:
    """`sha256:<hex>` over the relative path, size and content digest of every file `listed_files` finds."""
    root = Path(root).resolve()
    files = listed_files(root)
    digests = file_digests(root, files)
    lines = "\n".join(f"{path.as_posix()}\t{size}\t{digest}" for path, (size, digest) in zip(files, digests))
    return f"sha256:{hashlib.sha256(lines.encode('utf-8', 'surrogateescape')).hexdigest()}"


def file_digests(root: str | os.PathLike, files: Iterable[str | os.PathLike]) -> list[tuple[int, str]]:
    """(size, sha256 hex) of each of `files` (paths relative to `root`, or absolute), in order; files whose size,
    modification time and inode are as remembered for `root` are not read again."""
    root = Path(root).resolve()
    paths = [root / f for f in files]
    stats = [os.stat(p) for p in paths]
    memo_file = _memo_path(root)
    memo = _read_memo(memo_file)
    keys = [_key(root, p, s) for p, s in zip(paths, stats)]
    todo = [i for i, key in enumerate(keys) if key not in memo]
    if todo:
        with ThreadPoolExecutor(min(_THREADS, len(todo))) as pool:
            for i, digest in zip(todo, pool.map(lambda i: _sha256(paths[i]), todo)):
                memo[keys[i]] = digest
        _write_memo(memo_file, {key: memo[key] for key in keys})  # only what the folder holds now
    return [(s.st_size, memo[key]) for s, key in zip(stats, keys)]


def _key(root: Path, path: Path, stat: os.stat_result) -> str:
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name = path.as_posix()
    return f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ino}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _memo_path(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = hashlib.sha256(os.fsencode(root)).hexdigest()[:24]
    return base / "deit-distill" / "digests" / f"{name}.tsv"


def _read_memo(path: Path) -> dict[str, str]:
    """The remembered digests (`key -> sha256`); an unreadable or damaged memo is as none (everything is read)."""
    memo = {}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            key, _, digest = line.rpartition("\t")
            if len(digest) == 64:
                memo[key] = digest
    return memo


def _write_memo(path: Path, memo: dict[str, str]) -> None:
    """Best effort: a memo that cannot be written (a read-only home) only means reading the files next time."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("".join(f"{key}\t{digest}\n" for key, digest in memo.items()), encoding="utf-8",
                           errors="surrogateescape")
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
