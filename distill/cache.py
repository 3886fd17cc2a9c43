"""Teacher-output cache: run the teacher once over E epochs of augmented views, train without it.

    distill cache-teacher --config configs/distill.yaml --epochs 30 --top_k 10 --out runs/cache
    distill fit --config configs/distill.yaml --data.teacher_cache runs/cache --model.teacher null

This module is the storage format (model-side: numpy and torch only); `distill.cache_writer`
runs the teacher over the views (a Lightning `predict`), `distill.cache_teacher` is the command.

In the DeiT recipe the frozen teacher costs more than the student. As in TinyViT, the cache
stores, for every (epoch, sample) of the training schedule, the seed of its augmented view
and the teacher's top-k probabilities on that view; training rebuilds the exact view (every
random draw of crop, flip, RandAugment, erasing and mixup/cutmix is seeded by (seed, epoch,
sample), and mixing partners are fixed pairs: `distill.data.EpochSampler(pairs=True)`), so
the student sees the image the teacher labelled, whatever the batch size, number of
workers or processes. One cache serves every student, sweep and restart on the same data.

Format: a folder, every array a NumPy `.npy` file (`np.load(path, mmap_mode="r")`), indexed
[epoch, repeat, sample] (repeat is 0 without repeated augmentation):

    meta.json     format version, the data fingerprint (file list hash, images, classes, seed,
                  transform options, mixing, repeated_aug), library versions, epochs, top_k,
                  teacher config, array shapes and dtypes
    index.npy     int16 / int32 (E, R, N, K)  the teacher's top-k classes, most probable first
    prob.npy      float16 (E, R, N, K)         their softmax probabilities (temperature 1)
    seed.npy      uint32 (E, R, N)             the seed of the view (before mixing)
    checksum.npy  float64 (E, R, N)            a weighted pixel sum of the (mixed) view, checked
                                               when training verifies the cache
    done.npy      bool (E, R, N)               entry written (units a pair leaves out stay False)

Distillation targets are rebuilt from the top-k as TinyViT does: the k probabilities as
stored, the rest of the mass spread evenly over the other classes. Hard distillation uses
the top-1 class (exactly the live teacher's argmax); soft distillation at temperature tau
uses q^(1/tau), renormalised (exact among the top k). The cache is written to `OUT.partial`
and renamed when complete: a killed build leaves no half-written cache and an existing one
is replaced only with --overwrite. The files are allocated in full before the build starts,
so a disk that cannot hold the cache is an error then, not a crash (SIGBUS) hours later; a
second build onto the same --out is refused while the first runs. Opening a cache checks
every array's shape and dtype against meta.json, so an edited or truncated file is named.
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_warn

from distill.errors import UserError

__all__ = ["TeacherCache", "cached_teacher_logits", "view_checksum", "library_versions", "FORMAT"]

FORMAT = "distill-teacher-cache/1"
ARRAYS = ("index", "prob", "seed", "checksum", "done")


def view_checksum(images: torch.Tensor) -> torch.Tensor:
    """(B,) float64: a position-weighted pixel sum of each view (a changed pixel changes it)."""
    if images.device.type == "mps":  # no float64 there
        images = images.cpu()
    with torch.autocast(images.device.type, enabled=False):  # the same arithmetic under any precision setting
        flat = images.detach().double().flatten(1)
        weights = torch.linspace(1.0, 2.0, flat.shape[1], dtype=torch.float64, device=flat.device)
        return flat @ weights


def cached_teacher_logits(index: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) log-probabilities from top-k: k stored, the remaining mass spread evenly.

    The loss treats them as teacher logits: argmax is the top-1 class, and softmax(logq / tau)
    is q^(1/tau) renormalised, the temperature-scaled teacher exactly among the top k.
    """
    prob = prob.float().clamp_min(1e-12)
    rest = (1.0 - prob.sum(-1, keepdim=True)).clamp_min(0.0) / max(num_classes - prob.shape[-1], 1)
    full = rest.clamp_min(1e-12).log().expand(-1, num_classes).clone()
    log_prob = prob.log()
    log_prob[:, 0] += 1e-6  # the stored top-1 stays the argmax when fp16 rounded it to a tie with the next
    return full.scatter_(1, index.long(), log_prob)


class TeacherCache:
    """A cache folder opened for reading (training) or writing (`distill cache-teacher`)."""

    def __init__(self, path: Path, meta: dict[str, Any], mode: str = "r") -> None:
        self.path, self.meta, self.mode = Path(path), meta, mode
        self._arrays: Optional[dict[str, np.ndarray]] = None

    # ------------------------------------------------------------------ layout
    @staticmethod
    def shapes(epochs: int, repeats: int, images: int, top_k: int, num_classes: int) -> dict[str, tuple[tuple, str]]:
        index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
        rows = (epochs, repeats, images)
        return {"index": ((*rows, top_k), index_dtype), "prob": ((*rows, top_k), "float16"),
                "seed": (rows, "uint32"), "checksum": (rows, "float64"), "done": (rows, "bool")}

    @classmethod
    def nbytes(cls, epochs: int, repeats: int, images: int, top_k: int, num_classes: int) -> int:
        return sum(math.prod(shape) * np.dtype(dtype).itemsize
                   for shape, dtype in cls.shapes(epochs, repeats, images, top_k, num_classes).values())

    @classmethod
    def create(cls, path: Path, meta: dict[str, Any]) -> "TeacherCache":
        """Allocate the arrays (sparse files: disk fills as entries are written) and meta.json."""
        path.mkdir(parents=True, exist_ok=True)
        shapes = cls.shapes(meta["epochs"], meta["repeats"], meta["fingerprint"]["train_images"], meta["top_k"],
                            len(meta["fingerprint"]["classes"]))
        meta = {**meta, "arrays": {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in shapes.items()}}
        for name, (shape, dtype) in shapes.items():
            file = path / f"{name}.npy"
            np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape).flush()
            _allocate(file)
        (path / "meta.json").write_text(json.dumps(meta, indent=2))
        return cls(path, meta, mode="r+")

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict[str, Any], epochs: Optional[int]) -> "TeacherCache":
        """Open a finished cache for training; refuse one built for other data, transform or schedule."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            partial = " (a build was interrupted: run distill cache-teacher again)" if Path(f"{path}.partial").exists() else ""
            raise UserError(f"data.teacher_cache: '{path}' is not a teacher cache (no meta.json){partial}; "
                            "write one with distill cache-teacher")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"data.teacher_cache: '{meta_file}' is not readable JSON ({err}); rebuild the cache") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"data.teacher_cache: '{path}' has format {found!r}, expected {FORMAT!r}")
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
            rank_zero_warn(f"data.teacher_cache: '{path}' was built with other library versions ({', '.join(changed)}); "
                           "the augmented views may differ: check with model.teacher_cache_verify")
        if epochs is not None and epochs > meta["epochs"]:
            raise UserError(f"data.teacher_cache: '{path}' holds {meta['epochs']} epochs of teacher outputs but "
                            f"trainer.max_epochs is {epochs}; rebuild it with --epochs {epochs} or train fewer epochs")
        cache = cls(path, meta)
        cache.check_arrays()
        return cache

    def check_arrays(self) -> None:
        """Every array file opens (a whole .npy) with the shape and dtype meta.json and the schedule imply."""
        meta = self.meta
        try:
            expected = self.shapes(meta["epochs"], meta["repeats"], meta["fingerprint"]["train_images"], meta["top_k"],
                                   len(meta["fingerprint"]["classes"]))
        except (KeyError, TypeError) as err:
            raise UserError(f"data.teacher_cache: '{self.path / 'meta.json'}' lacks {err}; rebuild the cache") from err
        for name, (shape, dtype) in expected.items():
            file = self.path / f"{name}.npy"
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError, EOFError) as err:  # missing, truncated, not a .npy
                raise UserError(f"data.teacher_cache: '{file}' cannot be read ({str(err).splitlines()[0][:120]}); "
                                "the cache is damaged: rebuild it with distill cache-teacher") from err
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise UserError(f"data.teacher_cache: '{file}' holds {array.dtype} {tuple(array.shape)}, but meta.json "
                                f"describes {dtype} {tuple(shape)} ({meta['epochs']} epochs, {meta['repeats']} repeats, "
                                f"{meta['fingerprint']['train_images']} images, top-{meta['top_k']}); the cache was "
                                "edited or damaged: rebuild it")

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Memory-mapped arrays, opened on first use (in each DataLoader worker: memmaps do not pickle)."""
        if self._arrays is None:
            self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode=self.mode) for name in ARRAYS}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    # ------------------------------------------------------------------ reading
    def entry(self, epoch: int, index: int, repeat: int) -> dict[str, torch.Tensor]:
        """The teacher's cached top-k for view (epoch, index, repeat), as tensors for a batch."""
        arrays = self.arrays
        if epoch >= self.meta["epochs"] or not arrays["done"][epoch, repeat, index]:
            raise UserError(f"data.teacher_cache: '{self.path}' has no entry for epoch {epoch}, image {index}, "
                             f"repeat {repeat}; it was built for {self.meta['epochs']} epochs: rebuild it")
        return {"teacher_index": torch.from_numpy(np.array(arrays["index"][epoch, repeat, index], dtype=np.int64)),
                "teacher_prob": torch.from_numpy(np.array(arrays["prob"][epoch, repeat, index], dtype=np.float32)),
                # float64 bits as int64: moves to any device (MPS has no float64) and is never cast by a precision plugin
                "checksum": torch.tensor(float(arrays["checksum"][epoch, repeat, index]), dtype=torch.float64).view(torch.int64)}

    # ------------------------------------------------------------------ writing
    def write(self, key: torch.Tensor, seed: torch.Tensor, logits: torch.Tensor, checksums: torch.Tensor) -> None:
        """Store the top-k of `logits` (B, C) for the views of a batch: their keys (B, 3) and seeds (B,)."""
        probs = logits.float().softmax(-1)
        values, indices = probs.topk(self.meta["top_k"], dim=-1)
        epoch, index, repeat = key.cpu().numpy().T
        arrays = self.arrays
        arrays["index"][epoch, repeat, index] = indices.cpu().numpy().astype(arrays["index"].dtype)
        arrays["prob"][epoch, repeat, index] = values.cpu().numpy().astype(np.float16)
        arrays["checksum"][epoch, repeat, index] = checksums.cpu().numpy()
        arrays["seed"][epoch, repeat, index] = seed.cpu().numpy().astype(np.uint32)
        arrays["done"][epoch, repeat, index] = True

    def flush(self) -> None:
        for array in (self._arrays or {}).values():
            array.flush()


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
            raise UserError(f"--out: cannot allocate {size / 2**30:.2f} GiB for '{file}' ({err.strerror}); free disk "
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
