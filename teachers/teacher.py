"""Frozen teachers for DeiT distillation: any timm classifier (a convnet, as DeiT prefers, or a ViT).

The teacher is frozen three ways: no parameter requires a gradient, `train()` never takes it
out of eval mode (so its BatchNorm statistics never move), and its forward runs in inference
mode. It re-normalises its input when the student's data normalisation differs from the one
it was trained with, and an architecture that takes one input size only (a ViT) sees the images
resized to the size it was trained at. A checkpoint of this project's `distill fit` is rebuilt as
that run built its model (a ViT at its own patch, width and size; a second head averaged in, as
its evaluation did), so any student trained here can teach.

Fast path (`precision`, `channels_last`, `compile`): in the DeiT recipe the frozen teacher costs
more than the student. By default (`auto`) it runs with bf16 weights under bf16 autocast where the
hardware computes bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX; fp16 on older GPUs),
in channels-last layout (docs/speed.md has the measurements). On its first batch the teacher runs
once in fp32 and once on the fast path and records their top-1 agreement (`fast_agreement`, logged
as `train/teacher_fast_agreement`); below 99% it stays in fp32, with a warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from distill.common.adapters import cpu_computes_bf16
from distill.common.checkpoints import extract_state_dict, read_weights_file, shapes_of, state_mismatch, student_state
from distill.common.errors import UserError, first_line
from distill.common.identity import verify_files
from distill.common.ranges import ClosedUnitInterval, PositiveInt, plain
from students.vit import DEIT_VARIANTS, Student, check_model_name

__all__ = ["Teacher"]


class Teacher(nn.Module):
    """A frozen timm classifier that labels the student's images.

    Args:
        model_name: a timm architecture, optionally with a hub tag (`regnety_160.deit_in1k`),
            or `local-dir:FOLDER` / `hf-hub:ID`.
        weights: where the weights come from: `pretrained` (timm's weights for the tag or
            folder in `model_name`; downloads unless cached), `none` (random: for tests only),
            or a path: a .safetensors file, a PyTorch state dict, a `.ckpt` of this project's
            teacher-training run, or a folder `timm.create_model('local-dir:...')` loads.
        num_classes: classes the weights predict; None reads them from the weights.
        mean: input normalisation the teacher was trained with; None takes it from a `.ckpt`
            of this project, else from timm's pretrained config of `model_name`.
        std: see `mean`.
        img_size: resolution the teacher sees; None: the student's (the images as given), except for an
            architecture of one fixed input size (a ViT), which sees its own (the size it was trained at).
            Set it to run a teacher at its own resolution, e.g. during a hi-res fine-tune.
        precision: `auto` (bf16 where the hardware runs it natively, fp16 on GPUs without
            bf16, else fp32), `32`, `bf16` or `16` (weights and autocast).
        channels_last: run convolutions in channels-last memory layout (oneDNN on CPUs; docs/speed.md has what
            it gains or costs per device).
        compile: `torch.compile` the teacher, with inductor's weight freezing (first batches slower while
            it compiles; pays off on long runs: docs/speed.md). Feature imitation's forward is not compiled.
        fast_min_agreement: the fast path's minimum top-1 agreement with fp32 on the first batch;
            below it the teacher stays in fp32 (0: never fall back).
    """

    def __init__(
        self,
        model_name: str = "regnety_160.deit_in1k",
        weights: str = "pretrained",
        num_classes: Optional[PositiveInt] = None,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        img_size: Optional[PositiveInt] = None,
        precision: Literal["auto", "32", "bf16", "16"] = "auto",
        channels_last: bool = True,
        compile: bool = False,
        fast_min_agreement: ClosedUnitInterval = 0.99,
    ) -> None:
        super().__init__()
        self.config = plain(dict(model_name=model_name, weights=weights, num_classes=num_classes, mean=mean, std=std,
                                 img_size=img_size, precision=precision, channels_last=channels_last, compile=compile,
                                 fast_min_agreement=fast_min_agreement))
        if not 0.0 <= fast_min_agreement <= 1.0:
            raise UserError(f"teacher.fast_min_agreement must lie in [0, 1], got {fast_min_agreement}")
        self.fast_min_agreement = fast_min_agreement
        self.precision, self.channels_last, self.compile = str(precision), channels_last, compile
        self.fast_dtype: Optional[torch.dtype] = None  # decided on the first batch, on its device
        self.fast_agreement: Optional[float] = None
        self._prepared = False
        self._run = None
        check_model_name(DEIT_VARIANTS.get(model_name, model_name), "teacher.model_name", tuple(DEIT_VARIANTS))
        # loading draws no random number the student's initialisation would see: the student a seed gives does not
        # depend on the teacher, its architecture or the file it was loaded from
        with torch.random.fork_rng(devices=[]):
            self.model, trained_norm = _build(model_name, weights, num_classes)
        _check_finite_weights(self.model, model_name, weights)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        own_size = trained_norm.get("img_size") or (cfg.get("input_size") or (None,))[-1]
        self.img_size = img_size if img_size is not None or not cfg.get("fixed_input_size") else own_size
        self.mean = tuple(mean or trained_norm.get("mean") or cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
        self.std = tuple(std or trained_norm.get("std") or cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
        self.model_name = model_name
        self.num_classes: int = self.model.num_classes
        self.requires_grad_(False)
        # x_teacher = x * scale + shift maps the student's normalisation onto the teacher's
        self.register_buffer("scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.renormalize = False
        self.train(False)

    @property
    def prepared(self) -> bool:
        """Whether the first batch has chosen the fast path (and measured `fast_agreement` if it is not fp32)."""
        return self._prepared

    def set_input_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Declare the normalisation of the images the teacher will be given (the student's)."""
        self.renormalize = tuple(mean) != self.mean or tuple(std) != self.std
        s_mean, s_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        t_mean, t_std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        self.scale.copy_(s_std / t_std)
        self.shift.copy_((s_mean - t_mean) / t_std)

    def train(self, mode: bool = True) -> "Teacher":
        """Always eval: a trainer switching the whole system to train mode must not move BN statistics."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, C), float32, for student-normalised images (B, 3, H, W)."""
        with torch.inference_mode():
            logits = self._forward_fast(self._inputs(x))
        return logits.clone()  # a normal tensor: the loss may keep it for the student's backward

    @property
    def feature_info(self) -> list[dict]:
        """timm's feature levels of the model (`num_chs`, `reduction`, `module` of each), for feature imitation."""
        return list(getattr(self.model, "feature_info", None) or [])

    @property
    def members(self) -> tuple["Teacher"]:
        """The teachers whose outputs make this one's: itself (a `TeacherEnsemble` has several; the two are used
        alike through `members`, `forward_members` and `forward_members_with_features`)."""
        return (self,)

    def forward_members(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (B, C), [the same logits]): an ensemble of one."""
        logits = self(x)
        return logits, [logits]

    def forward_members_with_features(self, x: torch.Tensor,
                                      levels: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_with_features` with one list of levels per member (here one), as an ensemble takes them."""
        return self.forward_with_features(x, levels[0])

    def forward_with_features(self, x: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (B, C), the feature maps (B, C_i, H_i, W_i) of timm's feature levels `levels`), float32, in one
        forward (timm's `forward_intermediates`; on the fast path, not compiled)."""
        with torch.inference_mode():
            x = self._inputs(x)
            taken = sorted(set(levels))  # timm returns the levels in the model's order, each once
            final, maps = self._forward_fast(x, lambda y: self.model.forward_intermediates(y, indices=taken))
            logits = self._forward_fast(final, self.model.forward_head)
        return logits.clone(), [maps[taken.index(level)].float().clone() for level in levels]

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Student-normalised images as this teacher takes them: its normalisation and size (first batch: the fast
        path chosen)."""
        x = x.float()
        if self.renormalize:
            x = x * self.scale + self.shift
        if self.img_size is not None and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        if not self._prepared:
            self._prepare(x)
        return x

    def _forward_fast(self, x: torch.Tensor, run: Optional[Callable] = None) -> Any:
        run = run or (self._run if self._run is not None else self.model)  # (a compiled module has no truth value)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fast_dtype is None:
            return _float(run(x))
        with torch.autocast(x.device.type, dtype=self.fast_dtype):
            return _float(run(x.to(self.fast_dtype)))

    def _prepare(self, x: torch.Tensor) -> None:
        """Choose the fast path for x's device; check its top-1 agreement with fp32 on this batch."""
        self._prepared = True
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        dtype = _fast_dtype(self.precision, x.device)
        fp32_logits = self._forward_fast(x)
        if not bool(torch.isfinite(fp32_logits).all()):  # hard distillation would train on argmax(NaN) silently
            raise UserError(f"teacher '{self.model_name}' ({self.config['weights']}): its outputs on the first batch are "
                            "not finite (NaN or inf); check the teacher's weights and its input normalisation "
                            "(teacher.mean / teacher.std)")
        if dtype is not None:
            fp32_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.to(dtype)
            self.fast_dtype = dtype
            fast_logits = self._forward_fast(x)
            agreement = (fast_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
            if not bool(torch.isfinite(fast_logits).all()):  # overflow in the reduced precision: fp32 it is
                agreement = 0.0
            self.fast_agreement = agreement
            if agreement < self.fast_min_agreement:
                warnings.warn(f"teacher: {dtype} top-1 agreement with fp32 is {agreement:.1%} < "
                              f"{self.fast_min_agreement:.0%} on the first batch; the teacher stays in fp32 (set "
                              "teacher.precision: '32' to skip the check, or lower teacher.fast_min_agreement)",
                              stacklevel=2)
                self.model.float().load_state_dict(fp32_state)
                self.fast_dtype = None
        if self.compile:  # frozen weights: inductor may fold and pre-pack them (CPU: oneDNN layouts)
            self._run = torch.compile(self.model, options={"freezing": True})


def _float(output: Any) -> Any:
    """Logits as float32; timm's (final features, intermediates) as they are (their consumer casts)."""
    return output.float() if isinstance(output, torch.Tensor) else output


def _fast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The reduced precision to run the teacher in on `device`, or None for fp32."""
    if precision == "32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_computes_bf16() else None
    return None  # mps, xla...: as the weights are


def _architecture(model_name: str) -> str:
    """timm's architecture of a model name: the pretrained tag dropped, this project's DeiT aliases resolved."""
    arch = model_name.split(".")[0]
    return DEIT_VARIANTS.get(arch, arch)


def _build(model_name: str, weights: str, num_classes: Optional[int]) -> tuple[nn.Module, dict]:
    """Create the timm model and load its weights; returns (model, normalisation found in a .ckpt)."""
    model_name = DEIT_VARIANTS.get(model_name, model_name)  # deit_tiny: timm's deit_tiny_distilled_patch16_224
    if weights == "pretrained":
        extra = {} if num_classes is None else {"num_classes": num_classes}
        try:
            return timm.create_model(model_name, pretrained=True, **extra), {}
        except (OSError, RuntimeError) as err:  # no network, no cached file, bad hub id
            raise UserError(
                f"teacher: could not fetch pretrained weights for '{model_name}' ({first_line(err, 120)}); "
                "set teacher.weights to a local .safetensors/.pth/.ckpt file or folder"
            ) from err
    if weights == "none":
        return timm.create_model(model_name, num_classes=num_classes or 1000), {}
    path = Path(weights)
    if path.is_dir():  # a timm folder: config.json + model.safetensors (what `distill export` writes)
        model = _load_folder(path)
        if model.pretrained_cfg.get("architecture") != model_name.split(".")[0]:
            raise UserError(f"teacher.weights: folder '{path}' holds a '{model.pretrained_cfg.get('architecture')}', "
                             f"not the teacher.model_name '{model_name}'")
        return model, {}
    raw = read_weights_file(path)
    built = _from_run_checkpoint(raw, model_name, num_classes, path)
    if built is not None:
        return built
    state_dict, hparams = extract_state_dict(raw, path)
    model = timm.create_model(model_name, num_classes=num_classes or 1000)
    found = _classes_in(state_dict, model)
    if num_classes is not None and found is not None and found != num_classes:
        raise UserError(f"teacher.num_classes is {num_classes} but '{path}' predicts {found} classes")
    if found is not None and found != model.num_classes:
        model.reset_classifier(found)
    _load_exactly(model, state_dict, model_name, path)
    hparams = hparams or {}
    norm = {"mean": hparams.get("input_mean"), "std": hparams.get("input_std")}
    return model, norm


def _from_run_checkpoint(raw: object, model_name: str, num_classes: Optional[int],
                         path: Path) -> Optional[tuple[nn.Module, dict]]:
    """A checkpoint of this project's `distill fit` whose student is `model_name`: the model as that run built it
    (`Student` from the checkpoint's student_config; a second head folded in, as the run evaluated), with the run's
    normalisation and input size. None for any other file (read as a plain state dict)."""
    config = raw.get("student_config") if isinstance(raw, dict) else None
    if not isinstance(config, dict) or _architecture(str(config.get("model_name"))) != _architecture(model_name):
        return None
    if num_classes is not None and config.get("num_classes") != num_classes:
        raise UserError(f"teacher.num_classes is {num_classes} but '{path}' predicts {config.get('num_classes')} classes")
    try:  # the raw weights, not an EMA's (to teach with a run's EMA: `distill export --ema`, then its folder)
        student = Student(**dict(config, pretrained=False))
        student.load_state_dict(student_state(raw))
    except (RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"teacher.weights: '{path}' does not fit its own student_config ({type(err).__name__}: "
                        f"{first_line(err)}); the checkpoint is "
                        "damaged or of another version of this project") from err
    hparams = raw.get("hyper_parameters") or {}
    return student.fused_model(), {"mean": hparams.get("input_mean"), "std": hparams.get("input_std"),
                                   "img_size": config.get("img_size")}


def _load_folder(path: Path) -> nn.Module:
    """A timm model folder (config.json + model.safetensors or pytorch_model.bin), as `distill export` writes."""
    weights = [name for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
               if (path / name).is_file()]
    if not (path / "config.json").is_file() or not weights:
        held = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise UserError(f"teacher.weights: folder '{path}' is not a timm model folder (it needs config.json and "
                        f"model.safetensors; it holds {held}); give a weights file or an export folder")
    if (path / "export_report.json").is_file():  # written by `distill export`: its files as it wrote them
        verify_files(path, "export_report.json", ["config.json", weights[0]], "teacher.weights",
                     "export the teacher again")
    try:
        return timm.create_model(f"local-dir:{path}", pretrained=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign weights file fails in many ways inside timm
        raise UserError(f"teacher.weights: folder '{path}' could not be loaded by timm ({first_line(err)}); re-export it "
                        "or give a weights file") from err


def _check_finite_weights(model: nn.Module, model_name: str, weights: str) -> None:
    """Refuse weights holding NaN or inf: the teacher's outputs would be garbage (argmax of NaN is class 0)."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise UserError(f"teacher '{model_name}': its weights ({weights}) hold non-finite values (NaN or inf) in "
                        f"{len(bad)} tensor(s), e.g. {bad[:3]}; give the teacher's weights before training diverged")


def _classes_in(state_dict: dict[str, torch.Tensor], model: nn.Module) -> Optional[int]:
    """Number of classes of the classifier weights in `state_dict` (timm's `classifier` key)."""
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _load_exactly(model: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str, path: Path) -> None:
    """Strict load with a one-line error naming the first mismatched keys."""
    mismatch = state_mismatch(shapes_of(model.state_dict()), shapes_of(state_dict))
    if mismatch:
        raise UserError(f"teacher.weights: '{path}' does not fit '{model_name}': {mismatch}")
    model.load_state_dict(state_dict)
