"""A few training steps under `torch.profiler`, summarised per step (kernel launches, host-device waits, scalar
reads, device idle time): `train_speed.py --profile-steps N` runs it after its timed steps, `gpu_check.py` prints it.
Kept apart from train_speed.py, which times the steps; this module only looks inside them."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch


class StepProfile:
    """`torch.profiler` over a few steps (after the timed ones: its overhead stays out of them), summarised per step:
    the device's kernel launches, the host's waits for the device (synchronisations, copies back), the aten ops the
    host dispatched, the reads of a scalar (`.item()`, `bool(t)`, ...; on a CPU, of host tensors too: the optimiser's
    step counters) and the share of the wall time the device ran nothing."""

    LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
    WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")

    def __init__(self, device: torch.device, steps: int, table: Optional[Path] = None, trace: bool = False) -> None:
        self.device, self.steps, self.table, self.trace = device, steps, table, trace
        self.profiler: Any = None
        self.began = 0.0
        self.summary: dict[str, Any] = {}

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile
        sync(self.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.began = time.perf_counter()

    def stop(self) -> None:
        sync(self.device)
        wall = time.perf_counter() - self.began
        self.profiler.__exit__(None, None, None)
        self.summary = summarize(self.profiler.events(), wall, self.steps, self.device.type == "cuda")
        if self.table:  # the ops by their own time, device first
            self.table.parent.mkdir(parents=True, exist_ok=True)
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=sort, row_limit=40)
            self.table.with_suffix(".txt").write_text(f"{self.steps} steps, {wall * 1e3:.1f} ms wall\n{table}\n")
            if self.trace:  # for Perfetto or chrome://tracing
                self.profiler.export_chrome_trace(str(self.table.with_suffix(".json.gz")))


def summarize(events: Any, wall_s: float, steps: int, cuda: bool) -> dict[str, Any]:
    """Per step: what the profiler saw (see `StepProfile`); None where only a GPU can tell."""
    def top_level_op(event: Any) -> bool:
        return event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
    summary: dict[str, Any] = {
        "step_ms": wall_s / steps * 1e3,
        "ops": sum(top_level_op(e) for e in events) / steps,
        "scalar_reads": sum(e.name == "aten::_local_scalar_dense" for e in events) / steps,
        "launches": None, "waits": None, "copies_back": None, "device_ms": None, "idle": None}
    if not cuda:
        return summary
    from torch.autograd import DeviceType
    on_device = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy_us, reach = 0.0, float("-inf")
    for start, end in on_device:  # the union of the device's intervals (streams may overlap)
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    summary.update(
        launches=sum(e.name.startswith(StepProfile.LAUNCHES) for e in events) / steps,
        waits=sum(e.name in StepProfile.WAITS for e in events) / steps,
        copies_back=sum(e.device_type == DeviceType.CUDA and "DtoH" in e.name for e in events) / steps,
        device_ms=busy_us / 1e3 / steps, idle=max(0.0, 1 - busy_us / 1e6 / wall_s))
    return summary


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
