"""INT8 ONNX for CPU serving: ONNX Runtime quantization of the matrix products, checked on accuracy.

Used by `distill export --int8`. The fp32 `model.onnx` of the export becomes `model.int8.onnx`;
only MatMul and Gemm (where a ViT spends its time) are quantized, with int8 weights:
- `dynamic` (the default): activations are quantized at run time from each batch's own range
  (ONNX Runtime's recipe for transformers on CPU); nothing to calibrate.
- `static`: activation ranges fixed in advance (QDQ format, uint8 activations, int8 weights per
  output channel, MinMax calibration on a configurable number of training images, chosen at
  random with a fixed seed), for runtimes that want a QDQ graph.
Images go through the export's own evaluation preprocessing (the one `predict` and `serve`
apply). The check is accuracy, not 1e-4 closeness (quantization moves every logit): top-1 on
the whole validation split of the INT8 model against the fp32 ONNX model, and the export is
refused when the drop exceeds the budget.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch.utils.data import DataLoader, Dataset, Subset

from distill.common.errors import UserError
from distill.data.images import display_name
from distill.data.sources import DIGITS, Source, open_source
from distill.deploy.inference import export_transform

__all__ = ["quantize_int8", "onnx_top1", "training_data", "Int8Method", "QUANTIZED_OPS"]

BATCH = 32


class _Batches(CalibrationDataReader):
    """ONNX Runtime's calibration reader over batches of preprocessed images."""

    def __init__(self, loader: DataLoader) -> None:
        self.batches: Iterator[Any] = iter(loader)

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        images, _ = next(self.batches, (None, None))
        return None if images is None else {"images": images.numpy()}


# The matrix products, where a ViT spends its time. Not the rest: timm's "same" max-pool (the hybrid student's
# stem) pads with -inf, which has no uint8 scale, and quantized it turns the whole model's output to noise; a
# quantized stem convolution (static) cost more in quantize/dequantize steps than it saved (docs/speed.md).
QUANTIZED_OPS = ("MatMul", "Gemm")
Int8Method = Literal["dynamic", "static"]


def quantize_int8(folder: Path, model: torch.nn.Module, out_name: str, source: Source,
                  calibration_images: int, max_drop: float, seed: int = 0, method: Int8Method = "dynamic",
                  ) -> dict[str, Any]:
    """Write `folder / out_name` from `folder / model.onnx`; returns the int8 entry of export_report.json.

    `model` is the export as timm loads it (for its preprocessing); `source` the data the student was
    trained on (`training_data`). Raises UserError when the INT8 top-1 is more than `max_drop` points below the
    fp32 ONNX model's.
    """
    transform = export_transform(model)
    val = source.split("val", transform)
    chosen: list[int] = []  # calibration images (static only)
    prepared, quantized = folder / "model.prepared.onnx", folder / out_name
    try:
        with _root_logging_at(logging.ERROR):
            quant_pre_process(str(folder / "model.onnx"), str(prepared), skip_symbolic_shape=True)
            if method == "dynamic":
                quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=list(QUANTIZED_OPS))
            else:
                train = source.split("train", transform)
                generator = torch.Generator().manual_seed(seed)
                chosen = torch.randperm(len(train), generator=generator)[:calibration_images].tolist()
                quantize_static(
                    str(prepared), str(quantized), _Batches(_loader(Subset(train, chosen))),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=list(QUANTIZED_OPS),
                )
    finally:
        prepared.unlink(missing_ok=True)
    fp32, int8 = onnx_top1(folder / "model.onnx", val), onnx_top1(quantized, val)
    drop = 100.0 * (fp32 - int8)
    entry = {"file": out_name, "method": method, "calibration_images": len(chosen), "validation_images": len(val),
             "fp32_onnx_top1": fp32, "int8_top1": int8, "drop_points": drop, "max_drop_points": max_drop,
             "ok": drop <= max_drop}
    if not drop <= max_drop:
        raise UserError(f"export --int8: top-1 on the validation split drops {drop:.2f} points ({100 * fp32:.2f}% fp32 "
                        f"-> {100 * int8:.2f}% INT8) > --int8_max_drop {max_drop:g}; "
                        + ("try more --calibration_images, " if method == "static" else "")
                        + "or serve the fp32 model (--backend onnx)")
    return entry


def onnx_top1(path: Path, dataset: Dataset) -> float:
    """Top-1 accuracy of an ONNX model (input `images`) on a dataset of (preprocessed image, label)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for images, labels in _loader(dataset):
        logits = session.run(None, {"images": images.numpy()})[0]
        correct += int((logits.argmax(1) == labels.numpy()).sum())
    return correct / max(1, len(dataset))


def training_data(data: str, names: list[str], img_size: int, recorded: bool,
                  columns: dict[str, str] | None = None) -> Source:
    """The dataset the student was trained on (`digits`, a folder with train/ and val/, or a Hugging Face dataset,
    read with the run's `columns`: image_column, label_column; `recorded`: read from the checkpoint rather than
    given as --data); a UserError naming --data if it is not there or has other classes."""
    if data != DIGITS and not Path(data).is_dir():
        origin = "the training data recorded in the checkpoint" if recorded else "the training data"
        raise UserError(f"export --data: {origin}, '{data}', is not a folder here; pass --data DIR (its train/ "
                        "calibrates, its val/ checks the accuracy)")
    try:
        source = open_source(data, img_size, **(columns or {}))
    except UserError as err:
        raise UserError(f"export --data: {err}") from err
    classes = [display_name(name) for name in source.classes]
    if classes != names:
        raise UserError(f"export --data: '{data}' has classes {classes[:5]}..., the student was trained "
                        f"on {names[:5]}...; pass --data with the training data")
    return source


def _loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=False, num_workers=0)


@contextlib.contextmanager
def _root_logging_at(level: int) -> Iterator[None]:
    """ORT's quantizer logs a root-logger warning per 1-D weight it leaves alone (LayerNorm scales): hidden here."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, level))
    try:
        yield
    finally:
        root.setLevel(before)
