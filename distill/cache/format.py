"""Teacher-output cache: run the teacher once over E epochs of augmented views, train without it.

    distill cache-teacher --config configs/distill.yaml --epochs 30 --top_k 10 --out runs/cache
    distill fit --config configs/distill.yaml --data.teacher_cache runs/cache --model.teacher null --model.feature_weight 0

This module is the storage format (model-side: numpy and torch, no Lightning); `distill.training.cache_writer`
runs the teacher over the views (a Lightning `predict`), `distill.commands.cache_teacher` is the command.

In the DeiT recipe the frozen teacher costs more than the student. As in TinyViT, the cache
stores, for every (epoch, sample) of the training schedule, the seed of its augmented view
and the teacher's top-k probabilities on that view; training rebuilds the exact view (every
random draw of crop, flip, RandAugment, erasing and mixup/cutmix is seeded by (seed, epoch,
sample), and mixing partners are fixed pairs: `distill.data.views.EpochSampler(pairs=True)`), so
the student sees the image the teacher labelled, whatever the batch size, number of
workers or processes. One cache serves every student, sweep and restart on the same data.

Format: a folder with `meta.json` and one shard folder per process of the build
(`shard-00000-of-00002/`, ...): each process writes only its own shard, so no two processes
write one file (safe on NFS and any shared filesystem). A shard holds, for each epoch, the views
that process labelled, in its order; every array a NumPy `.npy` file (`np.load(path,
mmap_mode="r")`) indexed [epoch, row]:

    meta.json     format version, the data fingerprint (file list hash, images, classes, seed,
                  transform options, mixing, repeated_aug), library versions, epochs, top_k,
                  teacher config, the shards and their rows per epoch
    view.npy      int32 / int64 (E, rows)       which view the row is: repeat * images + image
    index.npy     int16 / int32 (E, rows, K)    the teacher's top-k classes, most probable first
    prob.npy      float16 (E, rows, K)          their softmax probabilities (temperature 1)
    seed.npy      uint32 (E, rows)              the seed of the view (before mixing)
    checksum.npy  float64 (E, rows)             a weighted pixel sum of the (mixed) view, checked
                                                when training verifies the cache
    done.npy      bool (E, rows)                row written

17 + 4k bytes per view (k = top_k; +2k above 32767 classes). A reader finds a view's shard and
row from the `view` arrays of the epoch it reads (one pass over them per epoch and process).
`distill cache-teacher --check DIR` checks a cache whole: every shard, every row written, every
epoch's views each once, every value usable (classes in range and distinct, probabilities finite,
in [0, 1], sorted, summing to at most 1; checksums finite).

Distillation targets are rebuilt from the top-k as TinyViT does: the k probabilities as
stored, the rest of the mass spread evenly over the other classes. Hard distillation uses
the top-1 class (exactly the live teacher's argmax); soft distillation at temperature tau
uses q^(1/tau), renormalised (exact among the top k). The cache is written to `OUT.partial`
and renamed when complete: a killed build leaves no half-written cache and an existing one
is replaced only with --overwrite. The files are allocated in full before the build starts,
so a disk that cannot hold the cache is an error then, not a crash (SIGBUS) hours later; a
second build onto the same --out is refused while the first runs. Opening a cache checks
every array's shape and dtype against meta.json, and the classes, probabilities and checksums of
the epochs the run trains are in range and finite, so an edited, truncated or garbled file is
named before the first epoch.
"""
from __future__ import annotations

import errno
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_only

from distill.common.errors import UserError, first_line
from distill.common.files import human_size

__all__ = ["TeacherCache", "library_versions", "FORMAT"]

FORMAT = "distill-teacher-cache/2"
ARRAYS = ("view", "index", "prob", "seed", "checksum", "done")


class TeacherCache:
    """A cache folder opened for reading (training), or one shard of it for writing (`distill cache-teacher`)."""

    def __init__(self, path: Path, meta: dict[str, Any], mode: str = "r", shard: Optional[int] = None) -> None:
        self.path, self.meta, self.mode, self.shard = Path(path), meta, mode, shard
        self._arrays: Optional[list[Optional[dict[str, np.ndarray]]]] = None
        self._located: tuple[int, Optional[np.ndarray]] = (-1, None)  # (epoch, its view -> shard * stride + row)

    # ------------------------------------------------------------------ layout
    @staticmethod
    def shapes(epochs: int, rows: int, top_k: int, num_classes: int, views: int) -> dict[str, tuple[tuple, str]]:
        """The arrays of one shard: `rows` views per epoch, out of `views` (images x repeats) in all."""
        index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
        view_dtype = "int32" if views <= np.iinfo(np.int32).max else "int64"
        return {"view": ((epochs, rows), view_dtype), "index": ((epochs, rows, top_k), index_dtype),
                "prob": ((epochs, rows, top_k), "float16"), "seed": ((epochs, rows), "uint32"),
                "checksum": ((epochs, rows), "float64"), "done": ((epochs, rows), "bool")}

    @classmethod
    def nbytes(cls, epochs: int, rows: int, top_k: int, num_classes: int, views: int) -> int:
        return sum(math.prod(shape) * np.dtype(dtype).itemsize
                   for shape, dtype in cls.shapes(epochs, rows, top_k, num_classes, views).values())

    def shard_shapes(self, shard: int) -> dict[str, tuple[tuple, str]]:
        meta = self.meta
        return self.shapes(meta["epochs"], meta["shard_rows"][shard], meta["top_k"], len(meta["fingerprint"]["classes"]),
                           meta["repeats"] * meta["fingerprint"]["train_images"])

    @staticmethod
    def shard_name(shard: int, shards: int) -> str:
        return f"shard-{shard:05d}-of-{shards:05d}"

    def shard_path(self, shard: int) -> Path:
        return self.path / self.shard_name(shard, self.meta["shards"])

    @classmethod
    def create_meta(cls, path: Path, meta: dict[str, Any]) -> None:
        """The folder and meta.json (rank 0, before any shard); `meta` names the shards and their rows."""
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def create_shard(cls, path: Path, meta: dict[str, Any], shard: int) -> "TeacherCache":
        """Allocate one shard's arrays (its process alone writes them)."""
        cache = cls(path, meta, mode="r+", shard=shard)
        folder = cache.shard_path(shard)
        folder.mkdir(parents=True, exist_ok=True)
        for name, (shape, dtype) in cache.shard_shapes(shard).items():
            file = folder / f"{name}.npy"
            np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape).flush()
            _allocate(file)
        return cache

    @classmethod
    def read_meta(cls, path: str | Path, option: str = "data.teacher_cache") -> dict[str, Any]:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            partial = " (a build was interrupted: run distill cache-teacher again)" if Path(f"{path}.partial").exists() else ""
            raise UserError(f"{option}: '{path}' is not a teacher cache (no meta.json){partial}; "
                            "write one with distill cache-teacher")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{option}: '{meta_file}' is not readable JSON ({err}); rebuild the cache") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"{option}: '{path}' has format {found!r}, expected {FORMAT!r}; rebuild it with "
                            "distill cache-teacher")
        return meta

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict[str, Any], epochs: Optional[int]) -> "TeacherCache":
        """Open a finished cache for training; refuse one built for other data, transform or schedule."""
        path = Path(path)
        if path.name.endswith(".partial") and path.is_dir():
            raise UserError(f"data.teacher_cache: '{path}' is an unfinished build (a killed or running "
                            "distill cache-teacher); train from the folder it becomes when the build ends")
        meta = cls.read_meta(path)
        saved = meta["fingerprint"]
        differ = [name for name in sorted(set(saved) | set(fingerprint)) if saved.get(name) != fingerprint.get(name)]
        if differ:
            name = differ[0]
            was, now = _short(saved.get(name)), _short(fingerprint.get(name))
            raise UserError(f"data.teacher_cache: '{path}' was built for another {name} ({was} in the cache, {now} "
                             f"here{'; also ' + ', '.join(differ[1:]) if differ[1:] else ''}); rebuild it with "
                             "distill cache-teacher and this config")
        versions = library_versions()
        changed = [f"{name} {meta.get('versions', {}).get(name)} -> {version}" for name, version in versions.items()
                   if meta.get("versions", {}).get(name) != version]
        if changed:
            if getattr(rank_zero_only, "rank", 0) == 0:  # the process rank Lightning sets (DDP: rank 0 alone warns)
                warnings.warn(f"data.teacher_cache: '{path}' was built with other library versions ({', '.join(changed)}); "
                              "the augmented views may differ: check with model.teacher_cache_verify", stacklevel=2)
        if epochs is not None and epochs > meta["epochs"]:
            raise UserError(f"data.teacher_cache: '{path}' holds {meta['epochs']} epochs of teacher outputs but "
                            f"trainer.max_epochs is {epochs}; rebuild it with --epochs {epochs} or train fewer epochs")
        cache = cls(path, meta)
        cache.check_arrays()
        cache.check_values(epochs=epochs)  # before any epoch: a class out of range would crash the loss mid-run
        return cache

    def check_arrays(self, option: str = "data.teacher_cache") -> None:
        """Every shard's array files open (whole .npy files) with the shapes and dtypes meta.json implies."""
        meta = self.meta
        try:
            shards = [self.shard_shapes(shard) for shard in range(meta["shards"])]
        except (KeyError, TypeError, IndexError) as err:
            raise UserError(f"{option}: '{self.path / 'meta.json'}' lacks {err}; rebuild the cache") from err
        for shard, expected in enumerate(shards):
            for name, (shape, dtype) in expected.items():
                file = self.shard_path(shard) / f"{name}.npy"
                try:
                    array = np.load(file, mmap_mode="r")
                except (OSError, ValueError, EOFError) as err:  # missing, truncated, not a .npy
                    raise UserError(f"{option}: '{file}' cannot be read ({first_line(err, 120)}); "
                                    "the cache is damaged: rebuild it with distill cache-teacher") from err
                if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise UserError(f"{option}: '{file}' holds {array.dtype} {tuple(array.shape)}, but meta.json "
                                    f"describes {dtype} {tuple(shape)} ({meta['epochs']} epochs, "
                                    f"{meta['shard_rows'][shard]} views an epoch in this shard, top-{meta['top_k']}); "
                                    "the cache was edited or damaged: rebuild it")

    def check_values(self, option: str = "data.teacher_cache", epochs: Optional[int] = None,
                     whole: bool = False) -> None:
        """The stored values usable, in the first `epochs` epochs (all by default): every class in 0..C-1,
        probabilities and checksums finite. `whole` (`--check`) adds: probabilities in [0, 1], most probable first,
        summing to at most 1, and k different classes in a row. One epoch of one shard in memory at a time."""
        meta, classes = self.meta, len(self.meta["fingerprint"]["classes"])
        for shard in range(meta["shards"]):
            arrays = self.shard_arrays(shard)
            for epoch in range(meta["epochs"] if epochs is None else min(epochs, meta["epochs"])):
                found = _first_bad_value(arrays, epoch, classes, whole)
                if found is not None:
                    name, (row, k), what, accepted = found
                    repeat, image = divmod(int(arrays["view"][epoch, row]), meta["fingerprint"]["train_images"])
                    entry = f"epoch {epoch}, row {row} (image {image}{f', repeat {repeat}' if repeat else ''})"
                    raise UserError(f"{option}: '{self.shard_path(shard) / name}.npy' holds {what} at {entry}"
                                    f"{f', top-{k + 1}' if k is not None else ''} (accepted: {accepted}); the cache "
                                    "is damaged: rebuild it with distill cache-teacher")

    def check_complete(self) -> str:
        """`distill cache-teacher --check`: every row written, every epoch's views each once over the shards."""
        self.check_arrays("--check")
        meta, views = self.meta, self.meta["repeats"] * self.meta["fingerprint"]["train_images"]
        for shard in range(meta["shards"]):
            done = self.shard_arrays(shard)["done"]
            if not done.all():
                epoch = int(np.nonzero(~done.all(axis=1))[0][0])
                raise UserError(f"--check: '{self.shard_path(shard)}' has {int((~done).sum())} unwritten rows (the "
                                f"first in epoch {epoch}): the build did not finish; rebuild the cache")
        for epoch in range(meta["epochs"]):
            seen = np.concatenate([self.shard_arrays(shard)["view"][epoch] for shard in range(meta["shards"])])
            if seen.min(initial=0) < 0 or seen.max(initial=0) >= views:
                raise UserError(f"--check: epoch {epoch} of '{self.path}' names a view out of 0..{views - 1}; the cache "
                                "is damaged: rebuild it")
            counts = np.bincount(seen.astype(np.int64), minlength=views)
            if (counts > 1).any():
                raise UserError(f"--check: epoch {epoch} of '{self.path}' holds a view twice (view "
                                f"{int(np.argmax(counts > 1))}); the cache is damaged: rebuild it")
        self.check_values("--check", whole=True)
        rows = sum(meta["shard_rows"]) * meta["epochs"]
        size = sum(file.stat().st_size for file in self.path.rglob("*.npy"))
        return (f"'{self.path}': complete, {rows} views ({meta['epochs']} epochs x {sum(meta['shard_rows'])}), "
                f"{meta['shards']} shard(s), top-{meta['top_k']} of {len(meta['fingerprint']['classes'])} classes, "
                f"{size / 2**20:.1f} MiB ({size / max(rows, 1):.0f} B per view)")

    def shard_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """A shard's memory-mapped arrays, opened on first use (in each DataLoader worker: memmaps do not pickle)."""
        if self._arrays is None:
            self._arrays = [None] * self.meta["shards"]
        if self._arrays[shard] is None:
            mode = self.mode if shard == self.shard else "r"
            self._arrays[shard] = {name: np.load(self.shard_path(shard) / f"{name}.npy", mmap_mode=mode)
                                   for name in ARRAYS}
        return self._arrays[shard]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_located": (-1, None)}

    # ------------------------------------------------------------------ reading
    def locate(self, epoch: int) -> np.ndarray:
        """(views,) int64 for `epoch`: shard * stride + row of each view, -1 for a view not in the cache."""
        if self._located[0] != epoch:
            meta = self.meta
            stride = max(meta["shard_rows"]) or 1
            where = np.full(meta["repeats"] * meta["fingerprint"]["train_images"], -1, dtype=np.int64)
            for shard in range(meta["shards"]):
                arrays = self.shard_arrays(shard)
                rows = np.nonzero(arrays["done"][epoch])[0]
                where[arrays["view"][epoch][rows]] = shard * stride + rows
            self._located = (epoch, where)
        return self._located[1]  # type: ignore[return-value]

    def row(self, epoch: int, index: int, repeat: int) -> dict[str, np.ndarray]:
        """The stored fields of view (epoch, index, repeat) as NumPy values."""
        found = -1
        if epoch < self.meta["epochs"]:
            found = int(self.locate(epoch)[repeat * self.meta["fingerprint"]["train_images"] + index])
        if found < 0:
            raise UserError(f"data.teacher_cache: '{self.path}' has no entry for epoch {epoch}, image {index}, "
                             f"repeat {repeat}; it was built for {self.meta['epochs']} epochs: rebuild it")
        shard, row = divmod(found, max(self.meta["shard_rows"]) or 1)
        arrays = self.shard_arrays(shard)
        return {name: arrays[name][epoch, row] for name in ("index", "prob", "seed", "checksum")}

    def entry(self, epoch: int, index: int, repeat: int) -> dict[str, torch.Tensor]:
        """The teacher's cached top-k for view (epoch, index, repeat), as tensors for a batch."""
        row = self.row(epoch, index, repeat)
        return {"teacher_index": torch.from_numpy(np.array(row["index"], dtype=np.int64)),
                "teacher_prob": torch.from_numpy(np.array(row["prob"], dtype=np.float32)),
                # float64 bits as int64: moves to any device (MPS has no float64) and is never cast by a precision plugin
                "checksum": torch.tensor(float(row["checksum"]), dtype=torch.float64).view(torch.int64)}

    # ------------------------------------------------------------------ writing
    def write(self, first_row: int, key: torch.Tensor, seed: torch.Tensor, logits: torch.Tensor,
              checksums: torch.Tensor) -> None:
        """Store the top-k of `logits` (B, C) for a batch of views: this shard's rows `first_row` on (counted
        over the epochs), their keys (B, 3: epoch, index, repeat) and seeds (B,)."""
        probs = logits.float().softmax(-1)
        values, indices = probs.topk(self.meta["top_k"], dim=-1)
        epoch, index, repeat = key.cpu().numpy().T
        rows_per_epoch = self.meta["shard_rows"][self.shard]
        position = first_row + np.arange(len(epoch))
        row_epoch, row = position // rows_per_epoch, position % rows_per_epoch
        if not np.array_equal(row_epoch, epoch):  # the sampler's order is the shard's order: a bug otherwise
            raise RuntimeError(f"teacher cache: shard {self.shard} expected epoch {row_epoch.tolist()} at rows "
                               f"{position.tolist()}, got epoch {epoch.tolist()}")
        arrays = self.shard_arrays(self.shard)
        arrays["view"][epoch, row] = repeat * self.meta["fingerprint"]["train_images"] + index
        arrays["index"][epoch, row] = indices.cpu().numpy().astype(arrays["index"].dtype)
        arrays["prob"][epoch, row] = values.cpu().numpy().astype(np.float16)
        arrays["checksum"][epoch, row] = checksums.cpu().numpy()
        arrays["seed"][epoch, row] = seed.cpu().numpy().astype(np.uint32)
        arrays["done"][epoch, row] = True

    def flush(self) -> None:
        for arrays in self._arrays or []:
            for array in (arrays or {}).values():
                if isinstance(array, np.memmap) and array.mode != "r":
                    array.flush()


def _first_bad_value(arrays: dict[str, np.ndarray], epoch: int, classes: int,
                     whole: bool) -> Optional[tuple[str, tuple[int, Optional[int]], str, str]]:
    """(array, (row, k or None for the whole row), what it holds, what is accepted) of the first bad value of
    `epoch`, or None. A cheap test of the whole epoch first (min/max, isfinite); positions only when it fails."""
    index, prob, checksum = (arrays[name][epoch] for name in ("index", "prob", "checksum"))  # (rows, K), (rows,)
    if not (index.min(initial=0) >= 0 and index.max(initial=0) < classes):
        row, k = np.argwhere((index < 0) | (index >= classes))[0].tolist()
        return "index", (row, k), f"the class {index[row, k]}", f"0..{classes - 1}"
    if not np.isfinite(prob).all():
        row, k = np.argwhere(~np.isfinite(prob))[0].tolist()
        return "prob", (row, k), f"the probability {prob[row, k]!s}", "a finite number in 0..1"
    if not np.isfinite(checksum).all():
        row = int(np.flatnonzero(~np.isfinite(checksum))[0])
        return "checksum", (row, None), f"the view checksum {checksum[row]}", "a finite number"
    if not whole:
        return None
    for bad, what, accepted in (((prob < 0) | (prob > 1), "", "0..1"),
                                (np.diff(prob, axis=-1, prepend=1.0) > 0, " above the one before it",
                                 "most probable first")):
        if bad.any():
            row, k = np.argwhere(bad)[0].tolist()
            return "prob", (row, k), f"the probability {prob[row, k]!s}{what}", accepted
    total = prob.astype(np.float32).sum(-1)
    if (total > 1.01).any():  # fp16 rounds each of the k probabilities by at most 2^-11 of itself
        row = int(np.flatnonzero(total > 1.01)[0])
        return "prob", (row, None), f"probabilities summing to {total[row]:.3f}", "at most 1"
    ordered = np.sort(index, axis=-1)
    twice = np.argwhere(ordered[:, 1:] == ordered[:, :-1])
    if len(twice):
        row, k = twice[0].tolist()
        k = int(np.flatnonzero(index[row] == ordered[row, k])[1])  # its second place in the row
        return "index", (row, k), f"the class {index[row, k]} twice", f"{index.shape[-1]} different classes"
    return None


def _allocate(file: Path) -> None:
    """Reserve the disk blocks of a (sparse) memory-mapped file now: a full disk fails here, not with SIGBUS later."""
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except AttributeError:  # no posix_fallocate (macOS, Windows): the free-space check before the build stands
            return
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the filesystem cannot preallocate
                return
            raise UserError(f"cache-teacher --out: cannot allocate {human_size(size)} for '{file}' ({err.strerror}); free disk "
                            "space on that filesystem or choose another --out") from err


def library_versions() -> dict[str, str]:
    """The versions the augmented views depend on (transforms, resampling, image decoding)."""
    import PIL
    import timm
    import torchvision
    return {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0],
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
