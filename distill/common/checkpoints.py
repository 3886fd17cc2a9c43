"""The one reader of weight files: this project's checkpoints, and the teacher weights a user was handed.

Nothing here unpickles arbitrary objects: safetensors files are read as tensors, every other
file goes through `torch.load(weights_only=True)`, which refuses pickled code. timm's
`clean_state_dict` removes the DDP / torch.compile wrapper prefixes. What timm has no helper
for is written here: the one-line errors naming the option and file, and this project's
checkpoint layout (the key prefixes below, defined only here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.models import clean_state_dict

from distill.common.errors import UserError, first_line
from distill.common.identity import LOCAL_DIR

__all__ = ["EMA", "STUDENT", "STUDENT_MODEL", "check_teacher_weights", "extract_state_dict", "load_student_state",
           "read_student_checkpoint", "read_weights_file", "recorded_run_options", "shapes_of", "state_mismatch",
           "student_state"]

# Where the student's weights sit in a checkpoint of `distill fit` (DistillationModule.state_dict()):
STUDENT = "student."                 # the Student module (its timm model and a distillation head, if any)
STUDENT_MODEL = STUDENT + "model."   # the timm model alone: what a teacher trained with configs/teacher.yaml is
EMA = "ema.module."                  # the student's EMA copy (model.ema_decay), with the Student's own keys

_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's load_state_dict order
ACCEPTED = "a .safetensors file, a PyTorch state dict (.pth/.pt/.bin) or a checkpoint of this project's runs (.ckpt)"
RUN_CHECKPOINT = "best.ckpt or last.ckpt of a `distill fit` run"


def read_weights_file(path: str | Path, option: str = "teacher.weights") -> dict[str, Any]:
    """Read a weights file without running code from it; errors name the file and what is accepted."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (from {Path.cwd()})"
        raise UserError(f"{option}: file '{path}' does not exist{where}; expected {ACCEPTED}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (code or garbage), SafetensorError, EOFError...
        raise UserError(f"{option}: '{path}' is not a weights file ({first_line(err)}); expected {ACCEPTED}") from err


def extract_state_dict(obj: Any, path: str | Path, option: str = "teacher.weights") -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return (timm state dict, this project's hyper-parameters or None) from what a file held.

    Accepts a flat state dict, a dict nesting one under a usual key (`state_dict`, `model`,
    `model_ema`, ...), and a Lightning checkpoint of this project, whose timm model's weights
    sit under `student.model.` (a teacher trained with `configs/teacher.yaml`).
    """
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{option}: '{path}' holds no state dict of tensors; expected {ACCEPTED}")
    if any(k.startswith(STUDENT_MODEL) for k in obj):
        return {k[len(STUDENT_MODEL):]: v for k, v in obj.items() if k.startswith(STUDENT_MODEL)}, hparams
    return clean_state_dict(obj), hparams  # saved from a DDP-wrapped or compiled model


def read_student_checkpoint(path: str | Path, option: str = "checkpoint") -> dict:
    """A checkpoint of this project (weights_only: nothing is unpickled); errors name the option and file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise UserError(f"{option}: '{path}' {what}; give {RUN_CHECKPOINT}")
    if path.stat().st_size == 0:
        raise UserError(f"{option}: '{path}' is empty (a copy or a save that did not finish); give {RUN_CHECKPOINT}")
    try:
        # mmap: tensors are read only when used
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # unpickling errors of every kind
        raise UserError(f"{option}: '{path}' is not a student checkpoint of this project ({first_line(err, 120)})") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(checkpoint.get("student_config"), dict):
        raise UserError(f"{option}: '{path}' is not a student checkpoint of this project (expected {RUN_CHECKPOINT})")
    return checkpoint


def student_state(checkpoint: dict, prefix: str = STUDENT) -> dict[str, torch.Tensor]:
    """The Student's weights of a checkpoint (`STUDENT`, or the EMA's: `EMA`), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def load_student_state(path: str | Path, option: str = "model.init_from") -> dict[str, torch.Tensor]:
    """The Student's weights (keys of `Student.state_dict()`) from a checkpoint of this project."""
    return student_state(read_student_checkpoint(path, option))


def state_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                   shapes: bool = True) -> str | None:
    """What keeps a strict load of `found` (tensor name -> shape) into a model whose state has `expected` from
    fitting, as one line (`2 missing (e.g. 'head.bias'), 1 of another shape (e.g. 'head.weight': [10, 64] in the
    file, [26, 64] in the model)`), or None when it fits; `shapes=False` compares the names alone (a caller that
    resamples what differs). Hand-written: torch's strict load lists every key, over many lines."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = [name for name in expected if shapes and name in found and tuple(found[name]) != tuple(expected[name])]
    parts = [f"{len(names)} {what} (e.g. '{names[0]}'{shape})" for names, what, shape in (
        (missing, "missing", ""), (unexpected, "unexpected", ""),
        (reshaped, "of another shape", f": {list(found[reshaped[0]])} in the file, {list(expected[reshaped[0]])} "
                                       "in the model" if reshaped else "")) if names]
    return ", ".join(parts) or None


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for `state_mismatch`."""
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def recorded_run_options(folder: Path) -> dict[str, Any] | None:
    """The options a run folder's newest checkpoint (`checkpoints/last.ckpt`, else `best.ckpt`) records it was made
    from (`run_options`, written by every `distill fit`), or None where there is none to read."""
    for name in ("last.ckpt", "best.ckpt"):
        path = Path(folder) / "checkpoints" / name
        if path.is_file():
            try:
                options = torch.load(path, map_location="cpu", weights_only=True).get("run_options")
            except Exception:  # unreadable or not a checkpoint of ours: nothing recorded to go by
                return None
            return options if isinstance(options, dict) else None
    return None


def check_teacher_weights(options: dict[str, Any], driver: str) -> None:
    """Refuse a teacher (or an ensemble's member) whose weights are a path that does not exist, in the run options
    a driver resolved (`fit_options`): an existing file or folder is recorded there by its content (`sha256:...`);
    `pretrained` and `none` name no file. (A run from a teacher cache builds its teacher too, to verify the cache.)"""
    teacher = options.get("model.teacher")
    members = teacher if isinstance(teacher, list) else [{"init_args": {
        "weights": options.get("model.teacher.init_args.weights"),
        "model_name": options.get("model.teacher.init_args.model_name")}}]
    for index, member in enumerate(members):
        init_args = (member.get("init_args") or {}) if isinstance(member, dict) else {}
        weights, model_name = init_args.get("weights"), init_args.get("model_name")
        which = f"model.teacher (member {index + 1} of {len(members)})" if len(members) > 1 else "model.teacher"
        if isinstance(model_name, str) and model_name.startswith(LOCAL_DIR) and not model_name.startswith(
                LOCAL_DIR + "sha256:") and not Path(model_name[len(LOCAL_DIR):]).is_dir():
            raise UserError(f"{driver}: {which}: model_name '{model_name}' names no folder (from {Path.cwd()}); "
                            "give a folder `distill export` or timm's `save_pretrained` wrote")
        if not isinstance(weights, str) or weights in ("pretrained", "none") or weights.startswith("sha256:"):
            continue
        if not Path(weights).exists():
            raise UserError(f"{driver}: {which}: weights '{weights}' does not exist (from {Path.cwd()}); train the "
                            f"teacher first or give its path; expected {ACCEPTED}, a folder `distill export` wrote, "
                            "'pretrained' or 'none'")
