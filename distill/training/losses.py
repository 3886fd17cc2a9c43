"""The training loss: the label term, a distillation method's terms and feature imitation, summed once.

    total = (1 - alpha) * label(cls_logits, target)
            + alpha * sum_t w_t * term_t(dist_logits, teacher_logits, target)     (the method: its terms, weights)
            + feature_weight * feature                                             (feature imitation, if on)

label: soft-target cross-entropy when mixup/cutmix produced soft targets (their label smoothing is
folded in by timm's Mixup), else label-smoothing cross-entropy. The method is one of the table in
distill/training/methods/ (none | soft | hard | dkd | dist), by name or as a `class_path` with its
options. Without a teacher (`none`) the distillation head learns the labels with the same label loss,
so the averaged inference output is never half an untrained head. Every term is returned by name
(`loss_base`, `loss_distill` or the method's own, `loss_feature`) beside the total `loss`, unweighted.

`LossRecord` keeps the parts of each training batch on the device until the host reads them,
every few steps, in one copy (a training step reads nothing from the device: docs/speed.md).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from distill.common.errors import UserError
from distill.common.ranges import ClosedUnitInterval, HalfOpenUnitInterval, KLNormalization, NonNegativeFloat, PositiveFloat
from distill.training.methods import METHODS, LogitMethod, MethodName, method_names

__all__ = ["DistillationLoss", "LossRecord", "loss_options", "method_config"]


class DistillationLoss(nn.Module):
    """The label term plus a distillation method's terms plus feature imitation; returns the total and its parts.

    Args:
        distillation: a method of distill/training/methods/ by name (none | soft | hard | dkd | dist: no teacher,
            Hinton's KL, DeiT's teacher labels, decoupled KD, DIST) or a class_path with its init_args (its
            options, e.g. DKD's beta, or standardize: logit standardisation). By name, a method's tau and
            kl_normalization are the ones below.
        alpha: weight of the method's terms, (1 - alpha) goes to the label term (DeiT: 0.5).
        tau: softmax temperature of a method given by name (DeiT's soft run: 3.0).
        label_smoothing: smoothing of the label cross-entropy (DeiT: 0.1; folded into mixup's targets).
        kl_normalization: soft by name: batchmean (KL summed over classes, averaged over the batch) or reference
            (divided by batch * classes, as the DeiT reference code).
        feature_weight: weight of feature imitation in the total (Li et al. 2022: the student's blocks learn the
            teacher's feature maps; their weight 2.5; distill/training/imitation.py); 0: off; needs a live teacher.
    """

    def __init__(
        self,
        distillation: Union[MethodName, LogitMethod] = "hard",
        alpha: ClosedUnitInterval = 0.5,
        tau: PositiveFloat = 1.0,
        label_smoothing: HalfOpenUnitInterval = 0.1,
        kl_normalization: KLNormalization = "batchmean",
        feature_weight: NonNegativeFloat = 0.0,
    ) -> None:
        super().__init__()
        given = {"tau": float(tau), "kl_normalization": kl_normalization}
        if isinstance(distillation, LogitMethod):
            _check_loss_options_reach(distillation, **given)
            self.method = distillation
        else:
            self.method = _by_name(distillation, tau, kl_normalization)
        # said when a fit starts (not by every command that rebuilds the loss from a checkpoint)
        shown = type(distillation).__name__ if isinstance(distillation, LogitMethod) else distillation
        self.unused_options = _unused(self.method, shown, given)
        self.distillation = self.method.name  # the method's name: none | soft | hard | dkd | dist | ...
        self.alpha, self.feature_weight = float(alpha), float(feature_weight)
        self.hard_target_loss = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else nn.CrossEntropyLoss()
        self.soft_target_loss = SoftTargetCrossEntropy()

    @property
    def needs_teacher(self) -> bool:
        return self.method.needs_teacher

    @property
    def repeated_parts(self) -> tuple[str, ...]:
        """The parts of `forward`'s dict that are no term of their own, so not logged: without a teacher (`none`)
        the total is the label loss, which `loss_base` and `loss_distill` only split by head (and repeat for a
        student with one head)."""
        return ("loss_base", "loss_distill") if not self.needs_teacher else ()

    def base(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices (B,) or mixup soft targets (B, C)."""
        if target.ndim == 2:
            return self.soft_target_loss(logits, target)
        return self.hard_target_loss(logits, target)

    def forward(
        self,
        cls_logits: torch.Tensor,
        dist_logits: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        feature: Optional[torch.Tensor] = None,
        epoch: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Returns {loss, loss_base, loss_<term>..., [loss_feature]}. Logits are (B, C); target is (B,) or (B, C);
        `feature`: the feature-imitation term (unweighted), when imitation is on; `epoch` (fractional) for methods
        whose weights change with it (DKD's warm-up)."""
        parts = {"loss_base": self.base(cls_logits, target)}
        if not self.needs_teacher:
            terms, weights = {"distill": self.base(dist_logits, target)}, {}
        elif teacher_logits is None:
            raise ValueError(f"distillation='{self.distillation}' needs teacher logits")
        else:
            terms, weights = self.method(dist_logits, teacher_logits, target, epoch), self.method.weights(epoch)
        total = (1.0 - self.alpha) * parts["loss_base"]
        for name, term in terms.items():
            parts[f"loss_{name}"] = term
            total = total + self.alpha * weights.get(name, 1.0) * term
        if feature is not None:
            parts["loss_feature"] = feature
            total = total + self.feature_weight * feature
        return {"loss": total, **parts}


def _by_name(name: str, tau: float, kl_normalization: str) -> LogitMethod:
    """A method of the table by name, with the loss's tau and kl_normalization where it takes them."""
    if name not in METHODS:
        raise ValueError(f"distillation: '{name}' is not a method (accepted: {', '.join(method_names())})")
    method = METHODS[name]
    given = {"tau": float(tau), "kl_normalization": kl_normalization}
    accepted = inspect.signature(method).parameters
    return method(**{k: v for k, v in given.items() if k in accepted})


def _unused(method: LogitMethod, name: str, given: Mapping[str, Any]) -> list[str]:
    """A line for each model option set away from its default that the method does not take (`hard` and model.tau):
    said, not refused, as `distill compare` gives the same options to every arm (soft at tau 3 beside hard)."""
    defaults = inspect.signature(DistillationLoss).parameters
    accepted = inspect.signature(type(method)).parameters
    return [f"model.{option} {value} is not used: the method '{name}' does not take it (its options: "
            f"{', '.join(accepted) or 'none'})"
            for option, value in given.items() if option not in accepted and value != defaults[option].default]


def _check_loss_options_reach(method: LogitMethod, **given: Any) -> None:
    """model.tau / model.kl_normalization set a method given by name; a method given as a class has its own: a value
    set on the model that differs from the class's would otherwise be recorded and not used."""
    defaults = inspect.signature(DistillationLoss).parameters
    accepted = inspect.signature(type(method)).parameters
    for option, value in given.items():
        if option not in accepted:
            continue
        own = getattr(method, option, value)
        if value != defaults[option].default and own != value:
            raise UserError(f"model.{option}: {value} applies to a method given by name; {type(method).__name__} "
                            f"takes its own ({own} now): --model.distillation.{option} {value}")


def method_config(method: LogitMethod) -> dict[str, Any]:
    """A method as jsonargparse builds it again (class_path, init_args): what a checkpoint records."""
    return {"class_path": f"{type(method).__module__}.{type(method).__qualname__}", "init_args": method.options()}


def loss_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`DistillationLoss`'s options with its defaults filled in: the one declaration of them (the training module
    takes them as `**loss` and records them flat among its hyper-parameters; a method object as its config)."""
    bound = inspect.signature(DistillationLoss).bind(**options)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if isinstance(arguments["distillation"], LogitMethod):
        arguments["distillation"] = method_config(arguments["distillation"])
    return arguments


class LossRecord:
    """Each training batch's loss parts, kept on the device until the host needs them.

    Reading a device value (`.item()`, `bool(t)`, a progress bar's number) makes the host wait until the device
    has run everything queued before it; done every step, the device idles while the host prepares the next one.
    The parts of each batch are stacked on the device (one kernel) and read in one copy when a check or a log
    needs them.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.rows: list[torch.Tensor] = []  # (batches, P) float32 since the last check, on the device
        self.where: list[tuple[int, int, int]] = []  # (epoch, global step, batch) of each row
        self.last_read: tuple[tuple[int, int, int], dict[str, float]] = ((0, 0, 0), {})

    def add(self, parts: dict[str, torch.Tensor], where: tuple[int, int, int]) -> None:
        self.names = tuple(parts)
        self.rows.append(torch.stack([v.detach().float() for v in parts.values()])[None])  # (1, P)
        self.where.append(where)
        if len(self.rows) >= 256:  # a long wait between checks: one tensor, not hundreds of small allocations
            self.rows = [torch.cat(self.rows)]

    def latest(self) -> dict[str, float]:
        """The latest batch's parts (one read from the device, none if the last check just read it)."""
        if self.rows:
            self.last_read = (self.where[-1], dict(zip(self.names, self.rows[-1][-1].tolist())))
        return self.last_read[1]

    def first_non_finite(self) -> Optional[tuple[tuple[int, int, int], dict[str, float]]]:
        """Reads every batch since the last call (one copy) and forgets them: the first whose loss is NaN or inf."""
        if not self.rows:
            return None
        read = [dict(zip(self.names, row)) for row in torch.cat(self.rows).tolist()]  # (N, P) in one copy
        where, self.rows, self.where = self.where, [], []
        self.last_read = (where[-1], read[-1])
        return next(((w, parts) for w, parts in zip(where, read) if not math.isfinite(parts["loss"])), None)
