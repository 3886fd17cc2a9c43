"""Seeds derived from (run seed, epoch, sample or batch index), so that a run is reproducible
step by step: a resumed run, or one with another worker count, draws the same numbers.

Lightning's `seed_everything` seeds a process once; the generators then advance with
everything that draws from them, so a restarted run (or a different number of data workers)
takes another path. Here each augmented view and each training step gets its own seed.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["global_seed", "sample_seed", "seeded"]


def global_seed() -> int:
    """The run's seed: Lightning's `seed_everything` (the CLI's `seed_everything` option) sets it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def sample_seed(*keys: int) -> int:
    """A 32-bit seed from integers (seed, epoch, index, ...): numpy's SeedSequence, stable across versions."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's CPU generators (what transforms draw from) for the block.

    In the main process they are put back afterwards, so nothing else's random stream moves. A
    data worker's generators serve only the views, each seeded anew: saving and restoring them
    there (about 0.1 ms, mostly numpy's state) would be a cost with no reader.
    """
    restore = get_worker_info() is None
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])
