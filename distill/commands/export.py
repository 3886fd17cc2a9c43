"""Export the student alone: a timm folder, optionally ONNX and TorchScript, each verified.

    distill export --ckpt runs/distill/checkpoints/best.ckpt --out exports/student

The folder loads with `timm.create_model('local-dir:exports/student', pretrained=True)`:
`config.json` (architecture, model args, label names, mean/std, input size, crop) and
`model.safetensors`. In eval mode the DeiT student returns the average of its two heads, so
every format gives the fused, averaged logits; a backbone with a distillation head on its
pooled features (Swin, ConvNeXt, ...) has the two heads folded into its own classifier (their
average is one linear layer), so the folder holds a plain timm model of that architecture. Each format is run on the same batch as the
PyTorch student and the largest absolute difference is written to `export_report.json`; the
export fails above the tolerance. The folder is built beside the target and renamed into
place, so a failed or killed export never leaves a half-written folder. An existing folder is
replaced only with `overwrite`, and only if it is an earlier export (nothing but an export's
own files) or empty; a second export writing the same folder at the same time is refused.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from distill.common.checkpoints import read_student_checkpoint
from distill.common.commandline import call, command
from distill.common.errors import UserError
from distill.common.files import OutputLock, lock_path, replace_folder, writing
from distill.common.identity import describe_differences, file_digest
from distill.common.processes import stop_on_sigterm
from distill.common.ranges import NonNegativeFloat, PositiveFloat, PositiveInt
from distill.deploy.inference import INT8_FILE, load_export, load_student
from distill.deploy.quantize import Int8Method, quantize_int8, training_data

__all__ = ["export_student", "load_export", "load_student", "main", "Int8", "INT8_FILE"]

TOLERANCE = 1e-4
# what an export folder holds; --overwrite replaces a folder holding nothing else
EXPORT_FILES = {"config.json", "model.safetensors", "export_report.json", "model.onnx", "model.onnx.data",
                "model.torchscript.pt", INT8_FILE, ".DS_Store"}


@dataclass(frozen=True)
class Int8:
    """What `--int8` asks: calibration images from the training split (static only), the accepted top-1 drop in
    points, the dataset (None: the one recorded in the checkpoint) and the method (distill/deploy/quantize.py)."""

    calibration_images: int = 256
    max_drop: float = 0.5
    data: Optional[str] = None
    method: Int8Method = "dynamic"


def int8_request(int8: bool = False, int8_method: Int8Method = Int8.method,
                 calibration_images: PositiveInt = Int8.calibration_images,
                 int8_max_drop: NonNegativeFloat = Int8.max_drop, data: Optional[str] = None) -> Optional[Int8]:
    """The INT8 model `distill export --int8` asks for, or None.

    Args:
        int8: also write model.int8.onnx: ONNX Runtime INT8 quantization, checked on accuracy
        int8_method: dynamic: activations quantized per batch at run time (fastest on CPU); static: QDQ graph with
            calibrated activation ranges
        calibration_images: training images that calibrate the INT8 ranges (--int8_method static)
        int8_max_drop: largest accepted drop of validation top-1 from fp32 ONNX to INT8, in points
        data: the training data, for --int8 (default: the dataset recorded in the checkpoint)
    """
    return Int8(calibration_images, int8_max_drop, data, int8_method) if int8 else None


def export_student(
    ckpt: str | Path, out: str | Path, *, onnx: bool = True, torchscript: bool = True, overwrite: bool = False,
    overwrite_stale: bool = False, tolerance: PositiveFloat = TOLERANCE, ema: bool = False, int8: Optional[Int8] = None,
) -> dict[str, Any]:
    """Write the export folder and return its report; raises before writing anything on bad input.

    An export at `out` made from the same checkpoint content with the same options (`current_export`) is kept
    (`"kept": True` in the report) unless `overwrite` asks to rebuild it; another export is replaced only with
    `overwrite` or `overwrite_stale`.

    Args:
        ckpt: a student checkpoint of this project (best.ckpt, last.ckpt)
        out: export folder to create
        onnx: also write model.onnx
        torchscript: also write model.torchscript.pt
        overwrite: replace an earlier export at --out, even one made from the same checkpoint and options (a folder
            holding anything else is never replaced)
        overwrite_stale: replace an earlier export only if it was made from another checkpoint (by content), other
            options or other library versions; keep a current one (distill pipeline does this)
        tolerance: largest accepted output difference
        ema: export the EMA weights (a run with model.ema_decay)
        int8: also write model.int8.onnx (ONNX Runtime INT8 quantization, checked on accuracy), as this asks
    """
    out = Path(os.path.abspath(out))  # `--out .` has no name of its own; `a/../b` is shown as `b`
    if int8 is not None and not onnx:
        raise UserError("export --int8 quantizes the ONNX model: drop --no-onnx")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"export --out: '{out.parent}' is a file, so '{out}' cannot be a folder")
    made_from = export_identity(ckpt, onnx, torchscript, tolerance, ema, int8)
    with OutputLock(lock_path(out), f"export --out '{out}'"):
        remove_leftovers(out)
        current = current_export(out, made_from)
        if current is not None and not overwrite:  # same checkpoint bytes and options, files intact
            return {**current, "kept": True}
        check_replaceable(out, overwrite or overwrite_stale, made_from)
        with writing(out, "export --out"):  # a full disk or a read-only folder: one line, the folder left as it was
            return _export(ckpt, out, onnx, torchscript, tolerance, ema, int8, made_from)


def export_identity(ckpt: str | Path, onnx: bool, torchscript: bool, tolerance: float, ema: bool,
                    int8: Optional[Int8]) -> dict[str, Any]:
    """What an export is made from: the checkpoint's content, the options that shape the folder, and the versions of
    the libraries that write and check it (an upgrade exports again)."""
    read_student_checkpoint(ckpt, "export --ckpt")  # a missing or foreign file is one line before it is hashed
    quantized = None
    if int8 is not None:
        quantized = dataclasses.asdict(int8)
        if int8.method == "dynamic":  # nothing is calibrated
            del quantized["calibration_images"]
        if int8.data and Path(int8.data).exists():
            quantized["data"] = str(Path(int8.data).resolve())
    options = {"onnx": onnx, "torchscript": torchscript, "tolerance": tolerance, "ema": ema, "int8": quantized}
    versions = {name: importlib.metadata.version(name) for name in ("torch", "timm", "onnx", "onnxruntime")}
    return {"checkpoint": file_digest(ckpt), "options": options, "versions": versions}


def current_export(out: Path, made_from: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The report of the export at `out` if it was made from `made_from` and holds exactly the files it wrote."""
    try:
        report = json.loads((out / "export_report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("made_from") != made_from:
        return None
    files = report.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return None
    held = {p.name for p in out.iterdir()} - {"export_report.json", ".DS_Store"}
    if held != set(files):  # a file added (a stray model.int8.onnx that serve would load) or removed
        return None
    try:
        intact = all(file_digest(out / name) == digest for name, digest in files.items())
    except OSError:
        return None
    return report if intact else None


def remove_leftovers(out: Path) -> None:
    """Folders of exports to `out` that were killed (SIGKILL, power loss) before they could clean up. Called under
    `out`'s lock, so no live export is building them; a previous export set aside and never replaced is put back."""
    name = glob.escape(out.name)
    for partial in out.parent.glob(f".{name}.tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{name}.old*")):
        if not out.exists() and old.is_dir():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: Path, overwrite: bool, made_from: Optional[dict[str, Any]] = None) -> None:
    """`out` may be written: it does not exist, or `overwrite` and it is an earlier export or empty."""
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"export: '{out}' already exists{_why_stale(out, made_from)}; pass --overwrite to replace it")
    if not out.is_dir():
        raise UserError(f"export --out: '{out}' is a file, not an export folder; choose another --out")
    held = sorted(p.name for p in out.iterdir())
    foreign = [name for name in held if name not in EXPORT_FILES]
    if held and not foreign and "export_report.json" not in held:  # a model folder of the same file names, not ours
        foreign = ["no export_report.json"]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(f"export --out: '{out}' is not an export folder (it holds {shown}); --overwrite replaces only "
                        "an earlier export or an empty folder: choose another --out")


def _why_stale(out: Path, made_from: Optional[dict[str, Any]]) -> str:
    """Why the existing export at `out` is not the one asked for (`current_export` said it is not)."""
    try:
        report = json.loads((out / "export_report.json").read_text())
    except (OSError, ValueError):
        return ""
    before = report.get("made_from") if isinstance(report, dict) else None
    if made_from is None or not isinstance(before, dict):
        return ""
    if before.get("checkpoint") != made_from["checkpoint"]:
        return " (made from another checkpoint: its content differs)"
    if before.get("options") != made_from["options"]:
        return f" (made with other options: {describe_differences(before.get('options') or {}, made_from['options'])})"
    if before.get("versions") != made_from["versions"]:
        changed = describe_differences(before.get("versions") or {}, made_from["versions"])
        return f" (made by other library versions: {changed})"
    return " (its files changed since it was written, or were added or removed)"


def _export(ckpt: str | Path, out: Path, onnx: bool, torchscript: bool, tolerance: float, ema: bool,
            int8: Optional[Int8], made_from: dict[str, Any]) -> dict[str, Any]:
    student, checkpoint = load_student(ckpt, ema)
    model, data = student.fused_model(), _data_config(checkpoint)
    training = None
    if int8 is not None:  # the data is checked before anything is written
        recorded = checkpoint.get("datamodule_hyper_parameters", {})
        source = int8.data or str(recorded.get("dataset", ""))
        names = data["label_names"] or [str(i) for i in range(student.num_classes)]
        columns = {k: recorded[k] for k in ("image_column", "label_column") if k in recorded}  # a HF dataset's
        training = training_data(source, names, int(data["input_size"][-1]), recorded=int8.data is None,
                                 columns=columns)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model_config = {"label_names": data.pop("label_names"), "pretrained_cfg": {"tag": "distilled"}}
        save_for_hf(model, tmp, model_config=model_config, data_config=data, safe_serialization=True)
        images = torch.randn(4, *data["input_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = student(images)  # the student as trained, heads averaged
        if not bool(torch.isfinite(expected).all()):
            raise UserError(f"export --ckpt: the student in '{ckpt}' gives non-finite outputs (its training diverged); "
                            "export an earlier checkpoint")
        report = {"checkpoint": str(ckpt), "weights": "ema" if ema else "student", "tolerance": tolerance, "batch": list(images.shape), "formats": {}}
        checks: dict[str, Callable[[], torch.Tensor]] = {"timm": lambda: _run_timm(tmp, images)}
        if onnx:
            checks["onnx"] = lambda: _run_onnx(model, tmp / "model.onnx", images)
        if torchscript:
            checks["torchscript"] = lambda: _run_torchscript(model, tmp / "model.torchscript.pt", images)
        for name, run in checks.items():
            diff = (run() - expected).abs().max().item()
            report["formats"][name] = {"max_abs_diff": diff, "ok": diff <= tolerance}
            if not diff <= tolerance:  # also NaN: a diverged student's outputs
                raise UserError(f"export: {name} output differs from PyTorch by {diff:.2e} > {tolerance:.0e} "
                                "(raise --tolerance, or export without that format)")
        if int8 is not None:
            report["formats"]["int8"] = quantize_int8(tmp, load_export(tmp, verify=False), INT8_FILE, training,
                                                      int8.calibration_images, int8.max_drop, method=int8.method)
        report["made_from"] = made_from  # what `current_export` compares before keeping this folder
        readable_by_all(tmp)
        report["files"] = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def readable_by_all(folder: Path) -> None:
    """Every file of `folder` with the permissions of a file created here (0644 under the usual umask): safetensors
    writes model.safetensors 0600, which another user's server could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _data_config(checkpoint: dict) -> dict[str, Any]:
    """Preprocessing of the run: what a user of the export must apply to their images."""
    hp = checkpoint.get("hyper_parameters", {})
    data_hp = checkpoint.get("datamodule_hyper_parameters", {})
    size = int(hp.get("img_size", 224))
    return {
        "input_size": (3, size, size),
        "mean": tuple(hp.get("input_mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        "std": tuple(hp.get("input_std", timm.data.IMAGENET_DEFAULT_STD)),
        "crop_pct": float(data_hp.get("crop_pct", 0.875)),
        "interpolation": str(data_hp.get("interpolation", "bicubic")),
        "label_names": list(hp.get("class_names") or []),
    }


def _run_timm(folder: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_export(folder, verify=False)(images)  # being built: no report yet


def _run_onnx(model: nn.Module, path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    torch.onnx.export(
        model, (images[:2],), str(path), input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False, external_data=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # exported with a batch of 2, run with 4: the batch dimension is dynamic
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def _run_torchscript(model: nn.Module, path: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of timm's shape asserts; jit.load's deprecation notice
        torch.jit.trace(model, images[:2]).save(str(path))
        return torch.jit.load(str(path))(images)


def _export_command(options: dict[str, Any]) -> None:
    """`distill export`: the export, then one line per format checked."""
    with stop_on_sigterm():  # killed by SIGTERM, the half-built folder is removed first
        report = call(export_student, {**options, "int8": call(int8_request, options)})
    out = options["out"]
    if report.get("kept"):
        print(f"export: '{out}' is already the export of '{options['ckpt']}' with these options (same checkpoint "
              "content, files intact): kept")
        return
    for name, result in report["formats"].items():
        if name == "int8":
            print(f"{name:12s} ({result['method']}) top-1 {100 * result['int8_top1']:.2f}% vs fp32 ONNX "
                  f"{100 * result['fp32_onnx_top1']:.2f}% "
                  f"({result['drop_points']:+.2f} points drop, budget {result['max_drop_points']:g}; "
                  f"{result['validation_images']} validation images)  ok")
            continue
        print(f"{name:12s} max |diff| vs PyTorch = {result['max_abs_diff']:.2e}  ok")
    print(f"exported to {out} (report: {Path(out) / 'export_report.json'})")


main = command("distill export", export_student, int8_request, skip=("export_student.int8",), run=_export_command,
               description=__doc__.split("\n\n")[0])

