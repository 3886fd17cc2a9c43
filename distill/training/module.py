"""DistillationModule: a ViT student learning from labels and a frozen teacher, a convnet as DeiT's (or several).

The teacher is held outside the module tree: it follows the module's device and dtype but is
not a submodule, so it is never in `parameters()`, the optimiser, DDP's gradient or buffer
sync, or a checkpoint's state dict. Checkpoints carry the student and teacher *configs* beside
the weights, so the student can be rebuilt (export) and the teacher re-created.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MetricCollection

from distill.common.checkpoints import load_student_state
from distill.common.console import say
from distill.common.errors import UserError
from distill.common.ranges import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    plain,
)
from distill.common.seeding import global_seed, sample_seed
from distill.data.batch import TrainingBatch
from distill.training.imitation import imitation_for
from distill.training.teacher_targets import TeacherTargets
from distill.training.losses import DistillationLoss, LossRecord, loss_options
from distill.training.learning_rate import lr_scale, scaled_lr
from distill.training.metrics import validation_metrics
from distill.training.run_checks import check_cache_holds, check_classes, check_optimizer, teacher_beside_cache
from distill.training.step_logging import host_value, writes_step_logs
from students.resize import adapt_student_state
from teachers import Teacher, TeacherEnsemble

__all__ = ["DistillationModule", "scaled_lr", "writes_step_logs"]

StudentFactory = Callable[[int, int], nn.Module]  # (num_classes, img_size) -> student


class DistillationModule(TeacherTargets, pl.LightningModule):
    """Student + frozen teacher + DistillationLoss + per-head metrics + AdamW/cosine.

    Args:
        student: builds the student from (num_classes, img_size), e.g. `students.Student`;
            in YAML a class_path with init_args, the two values linked from the data.
        teacher: the frozen teacher, a list of teachers (an ensemble: its prediction is the mean
            of their probabilities; `val/teacher_acc` is the ensemble's, `val/teacher_acc_<i>` each
            member's), or null for plain supervised training (how a teacher for a new dataset is trained).
        num_classes: classes of the dataset (linked from the data module).
        class_names: names of the classes (linked from the data module; saved for export).
        img_size: input resolution (linked from the data module).
        input_mean: normalisation of the images (linked from the data module).
        input_std: see input_mean.
        optimizer: a timm optimiser name (DeiT: adamw).
        lr: peak learning rate; with `lr_scale_batch`, the rate for that global batch.
        weight_decay: weight decay, not applied to norms, biases, tokens and position embeddings.
        opt_eps: optimiser epsilon (DeiT: 1e-8).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        warmup_lr: learning rate at the start of warmup.
        min_lr: learning rate at the end of the cosine decay.
        lr_scale_batch: scale `lr`, `warmup_lr` and `min_lr` at fit time by global batch / this
            (global batch = nodes x devices x batch_size x accumulate_grad_batches; DeiT: 512);
            null uses them as given. The scaled values are printed and logged.
        ema_decay: keep an exponential moving average of the student's weights with this decay
            (DeiT: 0.99996), validated beside the raw weights (`val_ema/...`) and exportable
            (`distill export --ema`); null: no EMA.
        init_from: a checkpoint of a previous stage to start the student from (weights only;
            optimiser and schedule start fresh). Position embeddings are resampled when the
            image size changed; heads are kept when the classes match.
        teacher_cache: the teacher cache the data module reads (linked from data.teacher_cache):
            distillation targets come from it, and no teacher runs unless verifying.
        teacher_cache_verify: with a teacher cache, the fraction of training batches on which the
            real teacher (model.teacher) also runs: logs `train/cache_agreement` (top-1 agreement
            of cached and live teacher) and `train/cache_view_match` (views replayed pixel-exact);
            0: the teacher is not kept in memory at all.
        finite_check_every: check that the loss is finite every this many optimiser steps (and at the end of
            every epoch, before validation and checkpoints): the check reads the loss from the device, which
            makes the host wait for it; the error still names the first step whose loss was not finite.
        compile: `torch.compile` the student's training forward (and so its backward); the first steps are
            slower while it compiles; validation runs uncompiled. Results differ from eager within float rounding.
        fused_optimizer: torch's fused kernel for the optimiser step (adamw, adam, sgd, ...: the optimisers that
            take `fused`); off: torch's default (one kernel per operation for all tensors on a GPU, a loop on a CPU).
        feature_pairs: the (student level, teacher level) pairs of timm feature levels (a ViT's blocks; a convnet's
            stem, then stages); null: the student's first, middle and last levels (all of them when it has fewer
            than three, as a small Swin's stages), the teacher's levels of reduction 4, 8 and 16 (give the pairs for
            a teacher without them, such as a ViT).
        **loss: the loss's options, declared once, by `DistillationLoss` (distill/training/losses.py): distillation
            (a method of distill/training/methods/ by name, none | soft | hard | dkd | dist, or a class_path with its
            options), alpha, tau, label_smoothing, kl_normalization, feature_weight; in a config they are the
            model's own keys (`model.distillation`, `model.alpha`, `model.feature_weight`, ...). `none` means no
            teacher at all: a configured teacher and feature imitation are left unused (said in one line).
    """

    def __init__(
        self,
        student: StudentFactory,
        teacher: Optional[Union[Teacher, list[Teacher]]] = None,
        num_classes: PositiveInt = 1000,
        class_names: Optional[list[str]] = None,
        img_size: PositiveInt = 224,
        input_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        input_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_DEFAULT_STD,
        optimizer: str = "adamw",
        lr: NonNegativeFloat = 5e-4,
        weight_decay: NonNegativeFloat = 0.05,
        opt_eps: PositiveFloat = 1e-8,
        warmup_epochs: NonNegativeFloat = 5.0,
        warmup_lr: NonNegativeFloat = 1e-6,
        min_lr: NonNegativeFloat = 1e-5,
        init_from: Optional[str] = None,
        lr_scale_batch: Optional[PositiveInt] = None,
        ema_decay: Optional[OpenUnitInterval] = None,
        teacher_cache: Optional[str] = None,
        teacher_cache_verify: ClosedUnitInterval = 0.0,
        finite_check_every: PositiveInt = 10,
        compile: bool = False,
        fused_optimizer: bool = False,
        feature_pairs: Optional[list[tuple[NonNegativeInt, NonNegativeInt]]] = None,
        **loss: Any,
    ) -> None:
        super().__init__()
        # built-in numbers, not jsonargparse's range types: checkpoints must load with weights_only; the loss's
        # options flat beside the others, with the loss's defaults (what `validate --ckpt_path` passes back)
        self.save_hyperparameters(plain({**{k: v for k, v in locals().items()
                                            if k not in ("self", "__class__", "student", "teacher", "loss")},
                                         **loss_options(loss)}))
        if isinstance(teacher, (list, tuple)):
            teacher = TeacherEnsemble(list(teacher)) if len(teacher) != 1 else teacher[0]
        check_optimizer(optimizer, fused_optimizer)
        assert ema_decay is None or 0.0 < ema_decay < 1.0, ema_decay  # OpenUnitInterval on the command line
        teacher = teacher_beside_cache(teacher, teacher_cache, teacher_cache_verify)
        self.loss = DistillationLoss(**loss)  # jsonargparse reads its parameters from this call: model.alpha, ...
        if not self.loss.needs_teacher:  # `none`: no teacher at all, so neither its outputs nor its features
            if teacher is not None or self.loss.feature_weight:
                say("model.distillation none: no teacher runs (model.teacher and feature imitation are left unused)")
            teacher, feature_pairs, self.loss.feature_weight = None, None, 0.0
            self.hparams.feature_weight = 0.0  # what the run does, as its checkpoint records it
        self.student = student if isinstance(student, nn.Module) else student(num_classes, img_size)
        check_classes(self.student, teacher, num_classes, self.loss.distillation, teacher_cache)
        if init_from:
            self.student.load_state_dict(adapt_student_state(load_student_state(init_from), self.student))
        if teacher is not None:
            teacher.set_input_normalization(input_mean, input_std)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the module docstring
        self.imitation = imitation_for(self.student, teacher, self.loss.feature_weight, feature_pairs, teacher_cache)
        self._fast_path_logged = False
        self._view_mismatch_warned = False
        self._step_before = 0  # global_step when the batch started: did the batch take an optimiser step?
        self._lr = 0.0  # the learning rate of the batch's step, logged after it
        self._losses = LossRecord()  # each batch's loss parts, on the device until read
        forward = self.student.forward_heads if self.imitation is None else self.student.forward_heads_and_features
        self._compiled_heads = torch.compile(forward) if compile else None  # at its first call
        self._forward = self._choose_forward()  # where a training step's targets come from: decided once, here
        # timm's EMA: a frozen copy, saved in checkpoints (`ema.module.*`), never in the optimiser
        self.ema = ModelEmaV3(self.student, decay=ema_decay).requires_grad_(False) if ema_decay else None
        members = len(teacher.members) if teacher is not None and len(teacher.members) > 1 else 0  # an ensemble's
        self.val_metrics = validation_metrics("val/", num_classes, members)
        self.val_ema_metrics = validation_metrics("val_ema/", num_classes, members, heads_only=True) if ema_decay else None
        self.test_metrics = validation_metrics("test/", num_classes, members)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "DistillationModule":
        """Moves and casts the (unregistered) teacher with the module: .to(), .cuda(), .half()."""
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference logits (B, C): the average of both heads for a distilled student."""
        cls_logits, dist_logits = self.student.forward_heads(x)
        return (cls_logits + dist_logits) / 2

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout and stochastic depth draw from a generator seeded by (seed, epoch, batch, rank):
        # a run resumed from a checkpoint takes exactly the steps an uninterrupted one takes
        torch.manual_seed(sample_seed(global_seed(), self.current_epoch, batch_idx, self.global_rank, 2))

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> torch.Tensor:
        # the teacher's targets and the student's outputs, from the source chosen when the module was built
        teacher_logits, (cls_logits, dist_logits), feature = self._forward(batch, batch_idx)
        epoch = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)  # DKD's warm-up
        parts = self.loss(cls_logits, dist_logits, batch.targets, teacher_logits, feature, epoch)
        # nothing is read from the device here: the parts are read, checked and logged in on_train_batch_end
        self._losses.add(parts, (self.current_epoch, self.global_step, batch_idx))
        self._step_before, self._lr = self.global_step, self.trainer.optimizers[0].param_groups[0]["lr"]
        self._say_fast_path_once()
        return parts["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = self.global_step != self._step_before  # not a batch that only accumulated gradients
        if self.ema is not None and stepped:  # once per optimiser step
            self.ema.update(self.student, step=self.global_step)
        last = batch_idx + 1 >= self.trainer.num_training_batches  # before validation and the epoch's checkpoints
        every = self.hparams.finite_check_every
        if last or (stepped and self.global_step % every == 0):
            self._check_finite()
        if last or writes_step_logs(self.trainer, stepped):
            # host values: the progress bar reads every logged value at every batch, a device value would make it wait
            parts = {f"train/{k}": host_value(v) for k, v in self._losses.latest().items()
                     if k not in self.loss.repeated_parts}
            self.log_dict(parts, prog_bar=True, on_step=True, on_epoch=False)
            # one curve of the scheduled rate (LearningRateMonitor would draw one per timm optimiser group, alike)
            self.log("train/lr", host_value(self._lr), on_step=True, on_epoch=False)

    def on_train_end(self) -> None:
        self._check_finite()  # the steps since the last check (a run stopped by max_steps mid-epoch)

    def on_validation_start(self) -> None:
        self._check_finite()  # before a validation inside the epoch (val_check_interval) and its checkpoint

    def _check_finite(self) -> None:
        """Stop on a NaN/inf loss among the batches since the last check, naming the first; every DDP rank stops
        together (each calls this at the same batch)."""
        first = self._losses.first_non_finite()
        finite = first is None
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        (epoch, step, batch_idx), parts = first or self._losses.last_read
        values = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        where = "" if first else " on another process"
        raise UserError(
            f"non-finite loss{where} at epoch {epoch}, step {step} (batch {batch_idx}): {values}; check the data for "
            "NaNs, or start from the last checkpoint's weights with a lower rate (model.init_from=<last.ckpt> "
            "--model.lr ... into another checkpoint.dirpath; a resumed run keeps its optimiser's rate)"
        )

    def on_validation_epoch_start(self) -> None:
        # fresh metric states: ones made under `trainer.validate` (inference mode) cannot be
        # updated in place later under `fit`'s no-grad validation (torchmetrics' MeanMetric)
        for metrics in (self.val_metrics, self.val_ema_metrics):
            if metrics is not None:
                metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self._evaluate(batch, self.val_metrics, "val/")
        if self.ema is not None:
            self._evaluate(batch, self.val_ema_metrics, "val_ema/", self.ema.module)
        return {"logits": logits, "targets": batch[1]}  # for callbacks (the telemetry's confusion matrix)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test/")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)  # (B, C) class probabilities

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, prefix: str,
        student: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        images, targets = batch
        cls_logits, dist_logits, tokens = (student or self.student).forward_with_tokens(images)
        logits = (cls_logits + dist_logits) / 2
        for name, head in (("acc_cls", cls_logits), ("acc_dist", dist_logits), ("acc", logits)):
            metrics[name].update(head, targets)
            metrics[f"{name}_top5"].update(head, targets)
        if cls_logits is not dist_logits:
            metrics["head_cosine"].update(F.cosine_similarity(cls_logits.float(), dist_logits.float(), dim=-1))
        if tokens is not None:
            metrics["token_cosine"].update(F.cosine_similarity(tokens[:, 0].float(), tokens[:, 1].float(), dim=-1))
        if self.teacher is not None and "teacher_acc" in metrics:
            teacher_logits, members = self.teacher.forward_members(images)
            for index, member_logits in enumerate(members if len(members) > 1 else ()):  # an ensemble's members
                metrics[f"teacher_acc_{index}"].update(member_logits, targets)
            metrics["teacher_acc"].update(teacher_logits, targets)
            metrics["teacher_agreement"].update(logits, teacher_logits.argmax(dim=-1))
            kl = F.kl_div(logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1), log_target=True,
                          reduction="none").sum(-1)
            metrics["teacher_kl"].update(kl)
        self.log(f"{prefix}loss", F.cross_entropy(logits, targets), prog_bar=False, sync_dist=True)
        # only the metrics that were updated: the teacher's are absent without a teacher
        for name, metric in metrics.items(keep_base=True):
            if metric.update_count > 0:
                self.log(f"{prefix}{name}", metric, prog_bar=name == "acc")
        return logits.detach()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        scale = self._lr_scale()
        # timm's param groups: no weight decay on 1-d params (norms, biases) and no_weight_decay()
        fused = {"fused": True} if hp.fused_optimizer else {}  # else torch's default: foreach on a GPU
        params = self.student if self.imitation is None else self.imitation.parameter_groups(self.student, hp.weight_decay)
        optimizer = create_optimizer_v2(
            params, opt=hp.optimizer, lr=hp.lr * scale, weight_decay=hp.weight_decay, eps=hp.opt_eps, **fused,
        )
        # linear warmup, then a cosine from exactly `lr` down to `min_lr` at the last step
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        warmup_steps = min(round(hp.warmup_epochs * steps_per_epoch), total_steps - 1)
        scheduler = CosineLRScheduler(
            optimizer, t_initial=total_steps - warmup_steps, lr_min=hp.min_lr * scale, warmup_t=warmup_steps,
            warmup_lr_init=hp.warmup_lr * scale, warmup_prefix=True, t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_scale(self) -> float:
        """global batch / lr_scale_batch (1 when scaling is off); printed and logged at fit time."""
        return lr_scale(self.trainer, self.hparams.lr, self.hparams.lr_scale_batch)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers count optimiser updates

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Plain-data configs beside the weights: export rebuilds the student, a reader sees the teacher.

        Not hyper-parameters: LightningCLI re-applies those as constructor arguments on
        `validate --ckpt_path`, and these are not constructor arguments.
        """
        if self.trainer.world_size == 1:  # no collective: under DDP a stop signal saves from one rank alone
            self._check_finite()  # no checkpoint of the steps after a non-finite loss (the weights are garbage)
        checkpoint["student_config"] = dict(getattr(self.student, "config", {}))
        checkpoint["teacher_config"] = dict(self.teacher.config) if self.teacher is not None else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another student before Lightning's long state-dict error would."""
        saved, own = checkpoint.get("student_config"), dict(getattr(self.student, "config", {}))
        if saved is None:
            raise UserError("ckpt_path: the checkpoint has no student_config; it was not written by this project's fit")
        differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {own.get(k)!r} here" for k in sorted(set(saved) | set(own))
                  if k not in ("pretrained", "drop_path_rate", "drop_rate") and saved.get(k) != own.get(k)]
        if differ:
            raise UserError(f"ckpt_path: the checkpoint is of another student ({'; '.join(differ[:3])}); "
                             "resume with the config it was trained with, or use model.init_from to start from its weights")
        theirs, ours = checkpoint.get("hyper_parameters", {}).get("class_names"), self.hparams.get("class_names")
        if theirs and ours and list(theirs) != list(ours):  # same count, other names or order: wrong answers, silently
            differ = [f"{i}: {a!r} in the checkpoint, {b!r} here"
                      for i, (a, b) in enumerate(zip(theirs, ours)) if a != b] or [
                          f"count: {len(theirs)} in the checkpoint, {len(ours)} here"]
            more = f", and {len(differ) - 1} more" if len(differ) > 1 else ""
            raise UserError(f"ckpt_path: the checkpoint was trained on other classes than data.dataset's (class "
                            f"{differ[0]}{more}); give data.dataset a folder with the checkpoint's class folders")

    def on_fit_start(self) -> None:
        # training from a teacher cache: only fit reads it (validate and test of such a run need no cache)
        check_cache_holds(self.loss.method, self.hparams.teacher_cache, self.hparams.num_classes)
        for line in self.loss.unused_options:
            say(line)
        config = getattr(self.student, "config", {})
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad) / 1e6  # student (+ imitation heads)
        say(f"Student: {config.get('model_name', type(self.student).__name__)} ({trainable:.2f}M trainable params, "
            f"{config.get('img_size', '?')} px, {config.get('num_classes', '?')} classes)")
        if self.teacher is not None:
            params = sum(p.numel() for p in self.teacher.parameters()) / 1e6
            say(
                f"Teacher: {self.teacher.model_name} ({params:.1f}M params, frozen, eval mode, "
                f"{self.teacher.num_classes} classes, not saved in checkpoints)"
            )


