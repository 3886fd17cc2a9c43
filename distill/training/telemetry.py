"""What a distillation user watches in TensorBoard beyond the losses and accuracies the module logs.

- `train/img_per_s` (all processes together, also in the progress bar), over the steps since the
  previous logged value, and `train/epoch_time_s`;
- the logging interval: every step when an epoch is shorter than `trainer.log_every_n_steps` (small data);
- `train/augmented_views`: the first training batch as the student and teacher see it (after
  mixup/cutmix), once, to check the augmentation;
- `val/confusion_matrix`: per validation epoch, rows normalised, class names on the axes;
- `val/attention_cls`, `val/attention_dist`: where the class token and the distillation token
  look (last block, averaged over heads) on a few fixed validation images, every N epochs (DeiT
  students);
- the HPARAMS tab: every hyper-parameter with `hp/best_acc`, `hp/final_acc` and friends.

Lightning's `ThroughputMonitor` logs samples/s but not to the progress bar, and timm's
`AttentionExtract` installs hooks for good and switches the model's mode; the small pieces
below do exactly what is needed instead.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torchmetrics.classification import MulticlassConfusionMatrix  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from distill.common.adapters import attention_weights  # noqa: E402
from distill.common.console import say  # noqa: E402
from distill.common.ranges import NonNegativeInt  # noqa: E402
from distill.training.step_logging import step_log_interval, writes_step_logs  # noqa: E402

__all__ = ["DistillationTelemetry", "attention_maps"]

HP_METRICS = ("hp/best_acc", "hp/final_acc", "hp/final_acc_cls", "hp/final_acc_dist", "hp/final_teacher_agreement")


class DistillationTelemetry(pl.Callback):
    """Throughput, pictures and the HPARAMS tab for a distillation run (TensorBoard).

    Args:
        attention_every_n_epochs: log attention maps every this many epochs (0: never).
        attention_images: how many fixed validation images the attention maps are drawn on.
        augmented_images: how many images of the first training batch to show (0: none).
        confusion_matrix: log a confusion matrix after each validation.
    """

    def __init__(self, attention_every_n_epochs: NonNegativeInt = 5, attention_images: NonNegativeInt = 8,
                 augmented_images: NonNegativeInt = 32, confusion_matrix: bool = True) -> None:
        self.attention_every_n_epochs = attention_every_n_epochs
        self.attention_images = attention_images
        self.augmented_images = augmented_images
        self.confusion_matrix = confusion_matrix
        self._matrix: Optional[MulticlassConfusionMatrix] = None
        self._epoch_start = 0.0
        self._window_start, self._window_images, self._step_before = 0.0, 0, 0  # since the last img/s logged

    # ------------------------------------------------------------------ logging interval
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's advice to lower log_every_n_steps for a short epoch, given before on_train_start does it
        warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging "
                                r"interval")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)  # rounded up; inf: unsized loader
        every = step_log_interval(trainer.log_every_n_steps, steps)
        if every != trainer.log_every_n_steps:
            say(f"trainer.log_every_n_steps {trainer.log_every_n_steps} is longer than an epoch ({steps} steps): "
                "training curves are logged every step")
            trainer.log_every_n_steps = every

    # ------------------------------------------------------------------ throughput
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._window_start = time.perf_counter()
        self._window_images = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step
        if trainer.global_step == 0 and batch_idx == 0 and self.augmented_images:
            self._log_augmented(trainer, pl_module, batch.images)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Images per second over the steps since the last logged value, on the steps Lightning writes: a step's own
        time on the host says nothing on an accelerator, where the host only queues the work."""
        self._window_images += batch.images.shape[0] * trainer.world_size
        if not writes_step_logs(trainer, trainer.global_step != self._step_before):
            return
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        if accelerator is not None and pl_module.device.type == accelerator.type:  # the module reads here anyway
            torch.accelerator.synchronize(pl_module.device)
        now = time.perf_counter()
        rate = self._window_images / max(now - self._window_start, 1e-9)
        self._window_start, self._window_images = now, 0
        # a host tensor: the progress bar turns its values into numbers at every batch (a device one would wait)
        pl_module.log("train/img_per_s", torch.tensor(rate), prog_bar=True, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window_start = time.perf_counter()  # validation inside an epoch is not training throughput
        self._window_images = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("train/epoch_time_s", time.perf_counter() - self._epoch_start, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ pictures
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.confusion_matrix and not trainer.sanity_checking:
            self._matrix = MulticlassConfusionMatrix(pl_module.hparams.num_classes, normalize="true").to(pl_module.device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._matrix is not None and isinstance(outputs, dict):
            self._matrix.update(outputs["logits"], outputs["targets"])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._matrix is not None:
            matrix = self._matrix.compute().cpu()  # synchronised over ranks
            self._matrix = None
            writer = _writer(trainer)
            if writer is not None:
                figure = _confusion_figure(matrix, pl_module.hparams.class_names)
                writer.add_figure("val/confusion_matrix", figure, trainer.global_step)
        every = self.attention_every_n_epochs
        if every and trainer.current_epoch % every == 0 and _writer(trainer) is not None:
            self._log_attention(trainer, pl_module)

    def _log_augmented(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: torch.Tensor) -> None:
        writer = _writer(trainer)
        if writer is None:
            return
        shown = _enlarge(_denormalize(images[: self.augmented_images].float().cpu(), pl_module))
        writer.add_image("train/augmented_views", make_grid(shown, nrow=8, padding=2), 0)

    def _log_attention(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = pl_module.student
        val_set = getattr(trainer.datamodule, "val_set", None)
        if not getattr(student, "distilled", False) or val_set is None or not len(val_set):
            return
        count = min(self.attention_images, len(val_set))
        images = torch.stack([val_set[i][0] for i in range(count)]).to(pl_module.device)
        maps = attention_maps(student, images)  # (B, 2, h, w), each map sums to 1
        shown = _enlarge(_denormalize(images.float().cpu(), pl_module))
        writer = _writer(trainer)
        for token, name in ((0, "cls"), (1, "dist")):  # red: where the token looks most, blue: least
            heat = maps[:, token : token + 1].cpu()
            heat = F.interpolate(heat / heat.amax(dim=(-2, -1), keepdim=True), size=shown.shape[-2:], mode="nearest")
            overlay = 0.45 * shown + 0.55 * torch.cat([heat, torch.zeros_like(heat), 1 - heat], dim=1)
            writer.add_image(f"val/attention_{name}", make_grid(overlay.clamp(0, 1), nrow=count, padding=2),
                             trainer.global_step)

    # ------------------------------------------------------------------ HPARAMS
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                # the hparams session declares these metrics; their values are logged at the end
                logger.log_hyperparams(_flat(pl_module.hparams), {name: 0.0 for name in HP_METRICS})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        values = {
            "hp/best_acc": best, "hp/final_acc": metrics.get("val/acc"), "hp/final_acc_cls": metrics.get("val/acc_cls"),
            "hp/final_acc_dist": metrics.get("val/acc_dist"),
            "hp/final_teacher_agreement": metrics.get("val/teacher_agreement"),
        }
        values = {k: float(v) for k, v in values.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)


def attention_maps(student: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): the class and distillation tokens' attention over the patch grid, in the last
    block, averaged over heads and renormalised to sum to 1 over the patches."""
    model = getattr(student, "model", student)
    was_training = student.training
    try:
        student.eval()
        with torch.no_grad(), attention_weights(model.blocks[-1].attn) as captured:
            model.forward_features(images)
    finally:
        student.train(was_training)
    weights = captured[-1].float().mean(dim=1)  # (B, N, N), softmax rows
    prefix = model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    maps = weights[:, :2, prefix:]  # the two tokens' rows, patch columns
    maps = maps / maps.sum(dim=-1, keepdim=True)
    return maps.reshape(images.shape[0], 2, *grid)


def _writer(trainer: pl.Trainer) -> Any:
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _denormalize(images: torch.Tensor, pl_module: pl.LightningModule) -> torch.Tensor:
    mean = torch.tensor(pl_module.hparams.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(pl_module.hparams.input_std).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def _enlarge(images: torch.Tensor, at_least: int = 96) -> torch.Tensor:
    """Small images (digits are 32 px) scaled up so that a grid of them can be read."""
    factor = -(-at_least // images.shape[-1])
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def _confusion_figure(matrix: torch.Tensor, class_names: Optional[list[str]]) -> plt.Figure:
    """Row-normalised rates, true class by row, predicted class by column: the class names whole on both axes (the
    x ones slanted) up to 50 classes, the rates in the cells up to 20. The figure is sized to the class count and
    the longest name, and laid out (constrained) so that no name or axis title is cut."""
    count = matrix.shape[0]
    names = [str(name) for name in class_names or range(count)]
    names = names if len(names) == count else [str(i) for i in range(count)]
    ticks = count <= 50  # a thousand names are unreadable and slow to draw
    side = min(max(3.0, 0.4 * count), 30.0)  # inches of the matrix: 0.4 a class
    margin = 0.8 + 0.07 * (max(map(len, names)) if ticks else 0)  # an axis title, then the longest name at 9 pt
    figure, axes = plt.subplots(figsize=(side + margin + 1.0, side + margin), layout="constrained")  # + colour bar
    image = axes.imshow(matrix.float().numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("share of each true class", fontsize=10)
    if ticks:
        axes.set_xticks(range(count), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        axes.set_yticks(range(count), names, fontsize=9)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if count <= 20:
        for (row, column), rate in np.ndenumerate(matrix.float().numpy()):
            axes.text(column, row, f"{rate:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if rate > 0.5 else "black")
    return figure


def _flat(hparams: Any) -> dict[str, Any]:
    """Hyper-parameters TensorBoard can show: numbers, strings and booleans; lists as text."""
    flat = {}
    for key, value in dict(hparams).items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            flat[key] = "null" if value is None else value
        elif isinstance(value, (list, tuple)) and len(value) <= 8:
            flat[key] = str(list(value))
    return flat
