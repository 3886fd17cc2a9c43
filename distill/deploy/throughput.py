"""Inference throughput on this machine with ONNX Runtime: the x axis of DeiT's Figure 1 (accuracy against
images per second), for a comparison's student and its teachers.

Every model is exported to ONNX (fp32, the batch dimension dynamic, as `distill export` does) and run by ONNX
Runtime's CPU provider with the same thread count. The models are timed *side by side*, and each as a server runs
it: every timed repeat runs each model in turn (starting with another model each repeat) for a block of
consecutive calls of at least `BLOCK_S` (a model called once between calls of the others would be timed with its
weights and code evicted from the CPU's caches, which serving does not do, and a small model of many operations
loses most to that), so a change of load reaches all of them alike; a model's figure is the batch size over the
median time of a call. An ensemble runs its members one after another for each batch (its throughput is that of
the sum of their times). Speed depends on the architecture, not on the trained weights, so
a teacher is measured as its timm architecture with the comparison's classes.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from students import DEIT_VARIANTS

__all__ = ["Member", "architecture", "measure_throughput"]


Member = tuple[nn.Module, int]  # a model and its input size
BLOCK_S = 0.02  # the least time of a block of consecutive calls of one model


def measure_throughput(models: dict[str, list[Member]], batches: tuple[int, ...] = (1, 64), repeats: int = 15,
                       threads: int = 1) -> dict[str, dict[int, float]]:
    """{name: {batch: images/s}} for `models` ({name: [(module, image size), ...]}), timed side by side."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="distill-speed-") as folder:
        exported: dict[int, tuple[Any, int]] = {}  # a module shared by two entries (a member, the ensemble): once
        for members in models.values():
            for module, size in members:
                if id(module) not in exported:
                    exported[id(module)] = (_session(module, size, Path(folder) / f"{len(exported)}.onnx", options), size)
        speed: dict[str, dict[int, float]] = {name: {} for name in models}
        names = list(models)
        for batch in batches:
            inputs = {size: np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
                      for _, size in exported.values()}
            for name in names:  # the warm-up: memory, ONNX Runtime's first-run work
                _call(models[name], exported, inputs, 2)
            block = {name: max(1, math.ceil(BLOCK_S / max(_call(models[name], exported, inputs, 3), 1e-6)))
                     for name in names}  # sized on warm calls
            times: dict[str, list[float]] = {name: [] for name in names}
            for repeat in range(repeats):
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    times[name].append(_call(models[name], exported, inputs, block[name]))
            for name in names:
                speed[name][batch] = batch / statistics.median(times[name])
    return speed


def _call(members: list[Member], exported: dict[int, tuple[Any, int]], inputs: dict[int, np.ndarray],
          count: int) -> float:
    """Seconds a call of a model (an ensemble: its members in turn), over `count` consecutive calls."""
    began = time.perf_counter()
    for _ in range(count):
        for module, _ in members:
            session, size = exported[id(module)]
            session.run(None, {"images": inputs[size]})
    return (time.perf_counter() - began) / count


def _session(module: nn.Module, size: int, path: Path, options: Any) -> Any:
    import onnxruntime as ort

    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on timm's shape asserts
        torch.onnx.export(module, (torch.randn(2, 3, size, size),), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                          verbose=False, external_data=False)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def architecture(model_name: str, classes: int) -> nn.Module:
    """A teacher's timm architecture (its hub tag dropped, this project's DeiT names resolved), untrained."""
    arch = model_name.split(".")[0]
    return timm.create_model(DEIT_VARIANTS.get(arch, arch), num_classes=classes)
