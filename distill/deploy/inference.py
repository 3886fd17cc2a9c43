"""An export folder for inference: the model as timm loads it, its preprocessing, its class names, top-k.

One place for what `predict`, `serve` and `export --int8` must do alike, so that they can
never disagree on how an image becomes a prediction.

An export is verified when it is loaded: each file read (config.json, model.safetensors, the ONNX model a
backend serves) must be the one `distill export` wrote, by the sha256 recorded in export_report.json
(`verify_export`); a file copied in from another export or edited by hand is refused, naming it.
It is also validated whole, so that a damaged or hand-edited folder is one
line naming the folder, the field and both values, and never an IndexError at the first image
or a server answering 500 to every request: config.json is readable JSON and a mapping whose
`architecture` is a timm model; `num_classes` equals `model_args.num_classes` and the number of
`label_names` (when there are any); `input_size`, `mean` and `std` are 3 channels of usable
numbers; model.safetensors holds exactly the tensors of that architecture (loaded strictly, its
head with `num_classes` rows); and one forward pass at the input size gives `num_classes` finite
outputs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torch import nn

import students  # also registers this project's architectures with timm (students.hybrid)
from distill.common.checkpoints import EMA, STUDENT, read_student_checkpoint, shapes_of, state_mismatch, student_state
from distill.common.errors import UserError, first_line
from distill.common.identity import verify_files

__all__ = ["INT8_FILE", "REPORT", "load_export", "verify_export", "read_config", "export_transform", "label_names", "best_classes", "CONFIG", "WEIGHTS",
           "EXPORT_AGAIN"]

INT8_FILE = "model.int8.onnx"  # the INT8 ONNX model of an export (`distill export --int8`, `serve --backend int8`)

CONFIG, WEIGHTS, REPORT = "config.json", "model.safetensors", "export_report.json"
EXPORT_AGAIN = "run distill export again"  # how every refusal of a damaged export ends


def load_student(ckpt: str | Path, ema: bool = False, option: str = "export --ckpt") -> tuple[students.Student, dict]:
    """The student of a checkpoint of this project (its EMA weights with `ema`), in eval mode, and the checkpoint."""
    checkpoint = read_student_checkpoint(ckpt, option)
    config = dict(checkpoint["student_config"], pretrained=False)  # weights come from the checkpoint
    student = students.Student(**config)
    state = student_state(checkpoint, EMA if ema else STUDENT)
    if not state:
        raise UserError(f"export --ema: '{ckpt}' holds no EMA weights (train with model.ema_decay set)")
    student.load_state_dict(state)
    return student.eval(), checkpoint


def load_export(folder: str | Path, option: str = "--export", verify: bool = True) -> nn.Module:
    """The exported student as timm builds it, its weights loaded strictly, in eval mode; a folder that is not a
    whole, consistent export is a UserError (see the module docstring for what is checked). `verify=False` only for
    the folder an export is building (it has no report yet)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{option}: '{folder}' is not a folder; give the folder distill export wrote")
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{option}: '{folder}' has no {' or '.join(missing)}; it is not a (whole) export folder: "
                        f"{EXPORT_AGAIN}")
    if verify:
        verify_export(folder, (CONFIG, WEIGHTS), option)
    config = read_config(folder, option)
    _check_config(folder / CONFIG, config, option)
    try:  # the fields were checked above: what fails here is model_args the architecture's factory does not take
        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=False).eval()
    except Exception as err:  # noqa: BLE001 - a factory refuses its arguments in many ways (TypeError, assert...)
        raise UserError(f"{option}: '{folder / CONFIG}' does not build its architecture {config['architecture']!r} "
                        f"({first_line(err, typed=True)}); {EXPORT_AGAIN}") from err
    _load_weights(folder, model, option)
    _check_forward(folder, config, model, option)
    return model


def verify_export(folder: Path, names: tuple[str, ...], option: str = "--export") -> dict[str, str]:
    """Each of `names` is the file `distill export` wrote into `folder` (its sha256 in export_report.json); with an
    ONNX model, its external weights file too when the export wrote one. Returns the digests checked."""
    if "model.onnx" in names and (folder / "model.onnx.data").exists():
        names = (*names, "model.onnx.data")
    return verify_files(folder, REPORT, names, option, EXPORT_AGAIN)


def read_config(folder: Path, option: str = "--export") -> dict[str, Any]:
    """An export's config.json as a mapping; a UserError naming the file if it is not one."""
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{option}: '{path}' is not readable JSON ({first_line(err, typed=True)}); {EXPORT_AGAIN}") from err
    if not isinstance(config, dict):
        raise UserError(f"{option}: '{path}' holds a JSON {type(config).__name__}, not a mapping of fields; "
                        f"{EXPORT_AGAIN}")
    return config


def _check_config(path: Path, config: dict[str, Any], option: str) -> None:
    """The fields of config.json that timm and the preprocessing use: present where needed, of usable values."""
    def refuse(field: str, value: Any, accepted: str) -> None:
        raise UserError(f"{option}: '{path}' {field}: {value!r}, expected {accepted}; {EXPORT_AGAIN}")

    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        refuse("architecture", architecture, "the name of a timm model (timm.list_models())")
    classes = config.get("num_classes")
    if not _is_int(classes) or classes < 1:
        refuse("num_classes", classes, "an integer of 1 or more")
    cfg = config.get("pretrained_cfg", {})
    args = config.get("model_args", {})
    for field, value in (("pretrained_cfg", cfg), ("model_args", args)):
        if not isinstance(value, dict):
            refuse(field, value, "a mapping")
    if "num_classes" in args and args["num_classes"] != classes:
        refuse("model_args.num_classes", args["num_classes"], f"the same as num_classes, {classes}")
    names = config.get("label_names", cfg.get("label_names"))
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        refuse("label_names", names, "a list of class names")
    if names and len(names) != classes:
        raise UserError(f"{option}: '{path}' label_names: {len(names)} names for num_classes {classes} (one name "
                        f"per class); {EXPORT_AGAIN}")
    size = cfg.get("input_size", [3, 1, 1])
    if not isinstance(size, list) or len(size) != 3 or size[0] != 3 or not all(_is_int(s) and s > 0 for s in size):
        refuse("pretrained_cfg.input_size", size, "[3, height, width] of positive integers (images are read as RGB)")
    for field in ("mean", "std"):
        value = cfg.get(field, [1.0] * 3)
        if (not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value)
                or (field == "std" and not all(v > 0 for v in value))):
            refuse(f"pretrained_cfg.{field}", value, "3 finite numbers (one per RGB channel)"
                                                      + (", each above 0" if field == "std" else ""))
    crop = cfg.get("crop_pct", 1.0)
    if not _is_number(crop) or not 0 < crop <= 1:
        refuse("pretrained_cfg.crop_pct", crop, "a number above 0 and at most 1")


def _load_weights(folder: Path, model: nn.Module, option: str) -> None:
    """model.safetensors into `model`, strictly: the same tensor names and shapes, the head's rows first."""
    path = folder / WEIGHTS
    try:
        with safe_open(str(path), "pt") as weights:  # the header alone: names and shapes
            found = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{option}: '{path}' could not be loaded ({first_line(err, typed=True)}); the file is damaged: "
                        f"{EXPORT_AGAIN}") from err
    expected = shapes_of(model.state_dict())
    heads = model.pretrained_cfg.get("classifier") or []
    for head in [f"{name}.weight" for name in ([heads] if isinstance(heads, str) else heads)]:
        if head in found and head in expected and found[head][:1] != expected[head][:1]:
            raise UserError(f"{option}: '{folder}' num_classes: {expected[head][0]} in {CONFIG}, but the head "
                            f"'{head}' in {WEIGHTS} has {found[head][0]} rows; {EXPORT_AGAIN}")
    mismatch = state_mismatch(expected, found)
    if mismatch:
        raise UserError(f"{option}: '{path}' does not hold the tensors of architecture "
                        f"'{model.pretrained_cfg.get('architecture')}' that {CONFIG} names: {mismatch}; {EXPORT_AGAIN}")
    model.load_state_dict(load_file(str(path)), strict=True)


def _check_forward(folder: Path, config: dict[str, Any], model: nn.Module, option: str) -> None:
    """One batch of zeros at the input size the preprocessing produces: `num_classes` finite outputs."""
    size = tuple(model.pretrained_cfg["input_size"])  # after timm's own repairs: what export_transform produces
    given = config.get("pretrained_cfg", {}).get("input_size")
    if given is not None and tuple(given) != size:  # timm takes a fixed-size model's model_args.img_size instead
        raise UserError(f"{option}: '{folder / CONFIG}' pretrained_cfg.input_size: {list(given)}, but its "
                        f"model_args build a model for {list(size)}; {EXPORT_AGAIN}")
    with torch.inference_mode():
        try:
            logits = model(torch.zeros(1, *size))  # (1, num_classes)
        except Exception as err:  # noqa: BLE001 - a model refuses an input size in many ways (assert, RuntimeError)
            raise UserError(f"{option}: '{folder / CONFIG}' pretrained_cfg.input_size: {list(size)} is not an input "
                            f"the model takes ({first_line(err, typed=True)}); {EXPORT_AGAIN}") from err
    if tuple(logits.shape) != (1, model.num_classes):
        raise UserError(f"{option}: '{folder}' num_classes: {model.num_classes} in {CONFIG}, but the model gives "
                        f"{logits.shape[-1]} outputs; {EXPORT_AGAIN}")
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"{option}: '{folder / WEIGHTS}' gives non-finite outputs (NaN or infinite weights); "
                        f"{EXPORT_AGAIN} from a checkpoint that trained")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def export_transform(model: torch.nn.Module) -> Callable[[Any], torch.Tensor]:
    """The evaluation preprocessing recorded in an export's config.json (used by predict and serve alike)."""
    return create_transform(**resolve_data_config({}, model=model))


def label_names(model: torch.nn.Module) -> list[str]:
    """The class names an export carries (its class indices as text if it has none)."""
    return model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]


def best_classes(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Probabilities and class indices of the `k` best classes of each row, best first."""
    probs, indices = logits.float().softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return probs.tolist(), indices.tolist()
