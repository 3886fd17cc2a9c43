"""A training step reads nothing back from the device: no `.item()`, `bool(t)`, `.tolist()` of a device value.

Each such read makes the host wait until the device has run everything queued before it: the next step's
kernels are then queued onto an idle GPU (docs/speed.md: fit's step against the plain loop). The loss is read
every `model.finite_check_every` optimiser steps and on the steps Lightning writes logs (`log_every_n_steps`).

On a CPU every tensor is a host tensor, so the test tells device values from host ones by where they come from:
the batch, the parameters and buffers, the optimiser's state (not its step counters: torch keeps those on the
host on every device) and everything computed from them are device values. A `TorchDispatchMode` follows them
through every operation and counts the reads of one (`aten._local_scalar_dense` is what `.item()`, `float()`,
`bool()` and `int()` run), and the tensors made from host numbers (`torch.tensor(x, device=...)`: a copy the host
waits for); `.tolist()`, `.cpu()` and `.numpy()` are counted by wrapping them.
"""
from __future__ import annotations

import traceback
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from distill.data.batch import TrainingBatch
from distill.training.datamodule import ImageDataModule
from distill.training.cli import make_cli
from tests.helpers import TINY_TEACHER, random_teacher_file, shrink

aten = torch.ops.aten
# what waits for the device when its input is a device value: a number read back, or a shape that depends on data
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
         aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default}
FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}  # torch.tensor(x, device=...) of host numbers


class DeviceReads(TorchDispatchMode):
    """Follows device values through every operation; while `counting`, records each read of one."""

    def __init__(self) -> None:
        super().__init__()
        self.device_values = WeakIdKeyDictionary()
        self.counting = False
        self.reads: list[str] = []

    def mark(self, *tensors: Any) -> None:
        for tensor in tree_flatten(list(tensors))[0]:
            if isinstance(tensor, torch.Tensor):
                self.device_values[tensor] = True

    def is_device_value(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor in self.device_values

    def record(self, what: str) -> None:
        if self.counting:
            caller = next((f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.line}"
                           for frame in reversed(traceback.extract_stack()[:-2])
                           if "/torch/" not in frame.filename and __file__ not in frame.filename), "?")
            self.reads.append(f"{what} at {caller}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs or {}))[0]
        from_device = any(self.is_device_value(t) for t in inputs)
        bool_index = func is aten.index.Tensor and any(t is not None and t.dtype == torch.bool
                                                      for t in tree_flatten(args[1])[0] if self.is_device_value(t))
        if (func in READS and from_device) or bool_index or func in FROM_HOST:
            self.record(str(func))
        out = func(*args, **(kwargs or {}))
        if from_device:
            self.mark(out)
        return out


class CountPerBatch(pl.Callback):
    """Counts from the start of each training batch to the end of Lightning's logging of it."""

    def __init__(self, mode: DeviceReads) -> None:
        self.mode = mode
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # the device values: parameters and buffers, the batch, the optimiser's state (its step counters are
        # host tensors on every device unless the optimiser is fused or capturable)
        self.mode.mark(list(pl_module.parameters()), list(pl_module.buffers()), vars(batch))
        if pl_module.teacher is not None:
            self.mode.mark(list(pl_module.teacher.parameters()), list(pl_module.teacher.buffers()))
        for state in trainer.optimizers[0].state.values():
            self.mode.mark([value for name, value in state.items() if name != "step"])
        self.mode.reads = []
        self.mode.counting = True
        self.batches.append({"batch": batch_idx, "step_before": trainer.global_step})

    def logging_done(self, trainer: pl.Trainer) -> None:
        self.mode.counting = False
        every, entry = trainer.lightning_module.hparams.finite_check_every, self.batches[-1]
        stepped = trainer.global_step != entry["step_before"]
        entry["reads"] = self.mode.reads
        entry["logs"] = stepped and trainer.global_step % trainer.log_every_n_steps == 0
        last = entry["batch"] + 1 == trainer.num_training_batches
        entry["checks"] = (stepped and trainer.global_step % every == 0) or last


def count_reads(tmp_path, monkeypatch) -> list[dict[str, Any]]:
    """A tiny distillation run (live teacher, mixup/cutmix, telemetry, progress bar, TensorBoard) of 8 batches:
    logs written every 4 steps, the loss checked every 3; each batch's reads."""
    teacher = random_teacher_file(tmp_path, TINY_TEACHER, 10)
    args = [*shrink(tmp_path, "distill.yaml"), f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={teacher}", "--data.batch_size=8", "--trainer.limit_train_batches=8",
            "--trainer.log_every_n_steps=4", "--model.finite_check_every=3", "--trainer.enable_progress_bar=true",
            "--trainer.num_sanity_val_steps=0", "--telemetry.augmented_images=0", "--telemetry.confusion_matrix=false",
            "--telemetry.attention_every_n_epochs=0"]
    cli = make_cli(args, run=False)
    mode = DeviceReads()
    counter = CountPerBatch(mode)
    cli.trainer.callbacks.insert(0, counter)  # the first hook of each batch
    connector = cli.trainer._logger_connector  # Lightning's last call for a batch: writing its logs
    update = connector.update_train_step_metrics

    def update_then_stop_counting() -> None:
        update()
        counter.logging_done(cli.trainer)
    monkeypatch.setattr(connector, "update_train_step_metrics", update_then_stop_counting)
    for name in ("tolist", "cpu", "numpy"):  # reads that dispatch nothing on a host tensor
        method = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _method: Any = method, _name: str = name, **k: Any) -> Any:
            if mode.is_device_value(self):
                mode.record(f"Tensor.{_name}")
            return _method(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with mode:
        cli.trainer.fit(cli.model, cli.datamodule)
    return counter.batches


def test_a_steady_state_training_step_reads_nothing_from_the_device(tmp_path, monkeypatch):
    batches = count_reads(tmp_path, monkeypatch)
    assert [b["batch"] for b in batches] == list(range(8))
    quiet = [b for b in batches[1:] if not b["logs"] and not b["checks"]]  # the first batch: the teacher's check
    assert [b["batch"] for b in quiet] == [1, 4, 6]  # global steps 2, 5, 7
    assert {b["batch"]: b["reads"] for b in quiet} == {1: [], 4: [], 6: []}
    # the counter sees the module's reads: the loss parts, in one copy, on each step that logs or checks
    for entry in batches[1:]:
        if entry["logs"] or entry["checks"]:
            assert sum("Tensor.tolist" in read and "losses.py" in read for read in entry["reads"]) == 1, entry


def test_the_mixing_on_an_accelerator_reads_nothing_back():
    """The mixing parameters stay on the host through the transfer; on the `meta` device (no data at all) a read of
    a device value would raise."""
    data = ImageDataModule("digits", img_size=32, batch_size=16, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    keys = torch.tensor([(2, 100 + i, 0) for i in range(16)])
    batch = TrainingBatch(torch.randn(16, 3, 32, 32), torch.arange(16) % 10, key=keys,
                          seed=torch.zeros(16, dtype=torch.int64))
    batch = data.on_before_batch_transfer(batch, 0)
    assert {0.0, 1.0} <= set(batch.mixing[:, 1].tolist())  # mixup and cutmix pairs both
    moved = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved.images.is_meta and moved.targets.is_meta and moved.mixing.device.type == "cpu"
    mixed = data.on_after_batch_transfer(moved, 0)
    assert mixed.images.is_meta and mixed.targets.shape == (16, 10) and mixed.mixing is None
