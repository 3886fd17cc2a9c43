"""Checkpointing for distillation runs: best by validation accuracy, last after every epoch,
written atomically, and saved on SIGTERM (preemption) or Ctrl+C."""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.common.adapters import batches_done_this_epoch, dump_checkpoint, is_local_path
from distill.common.console import say
from distill.common.errors import UserError
from distill.common.files import replace_file

__all__ = ["BestAndLastCheckpoint"]


class BestAndLastCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` is rewritten after every validation, never half-written,
    and also saved when the run is stopped by SIGTERM or Ctrl+C.

    Lightning 2.6 writes `last.ckpt` only when a top-k checkpoint was written in the same
    step, so with `save_top_k=1` a run whose accuracy stopped improving would resume
    (`--ckpt_path last`) from its best epoch instead of its latest one. Lightning also writes
    checkpoints in place, so a kill during the write would leave a truncated file; here each
    file is written beside its target and renamed over it. On SIGTERM (a cluster preempting
    the job) Lightning stops after the current batch; `last.ckpt` is then saved mid-epoch and
    `--ckpt_path last` continues from the next batch. (Lightning's `OnExceptionCheckpoint` saves on any
    exception through the strategy's barrier, which hangs when DDP ranks stop at different batches, and knows
    nothing of an open accumulation window: hence this.)
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        stopped = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        if not (stopped and self.save_last and not trainer.sanity_checking and trainer.state.fn == "fit"):
            return
        done = batches_done_this_epoch(trainer)
        if done % trainer.accumulate_grad_batches and done < trainer.num_training_batches:
            # the accumulated gradients are not in a checkpoint: resume from the previous save instead
            say(f"{type(exception).__name__}: stopped inside a gradient-accumulation window; "
                f"'{self.last_model_path}' (step {self._last_global_step_saved}) is kept, resume from it")
            return
        if self._last_global_step_saved != trainer.global_step and self._epoch_trained_not_closed(trainer):
            # Lightning resumes a save made after an epoch's last step into the next epoch, without that epoch's
            # validation (nor, after the final epoch, any validation: the run's final figures would be missing)
            kept = (f"'{self.last_model_path}' is kept, resume from it (the steps since it are trained again)"
                    if self.last_model_path and Path(self.last_model_path).is_file()
                    else "no checkpoint was saved yet: run it again")
            say(f"{type(exception).__name__}: stopped after epoch {trainer.current_epoch + 1}'s last step, before the "
                f"epoch's end (its validation, its save); {kept}")
            return
        if self._last_global_step_saved != trainer.global_step:
            if trainer.world_size > 1:
                self._save_on_rank_zero(trainer)  # the other ranks may be a batch behind: no collective
            else:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        say(f"{type(exception).__name__}: stopped at step {trainer.global_step}; "
            f"'{self.last_model_path}' holds it, resume with --ckpt_path last")

    @staticmethod
    def _epoch_trained_not_closed(trainer: pl.Trainer) -> bool:
        """The current epoch took its last optimiser step, and its end (validation, the save after it) has not run."""
        batches = trainer.num_training_batches
        if batches == float("inf"):
            return False
        steps_per_epoch = -(-int(batches) // trainer.accumulate_grad_batches)
        return trainer.global_step == (trainer.current_epoch + 1) * steps_per_epoch

    def _save_on_rank_zero(self, trainer: pl.Trainer) -> None:
        """last.ckpt written by rank 0 alone: under DDP a stop signal reaches the ranks at different
        batches, so the barrier of `trainer.save_checkpoint` would wait forever."""
        path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path
        checkpoint = dump_checkpoint(trainer, self.save_weights_only)
        if trainer.is_global_zero:
            partial = f"{path}.partial"
            try:
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, partial)
                replace_file(partial, path)
            finally:
                _remove(partial)
        self._last_global_step_saved = trainer.global_step

    def _save_last_if_skipped(self, trainer: pl.Trainer) -> None:
        # skipped by the parent when nothing else was saved at this step (and during sanity checks)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        _refuse_diverged(trainer, filepath)
        if not is_local_path(filepath):  # object stores write whole objects anyway
            return super()._save_checkpoint(trainer, filepath)
        partial = f"{filepath}.partial"
        try:
            super()._save_checkpoint(trainer, partial)  # every rank takes part; rank 0 writes, then all wait
            if trainer.is_global_zero:
                replace_file(partial, filepath)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError, without errno
            if not _no_space(err):
                raise
            earlier = sorted(p.name for p in Path(filepath).parent.glob("*.ckpt"))
            resume = ("--ckpt_path last" if any(name.startswith("last") for name in earlier) else
                      f"--ckpt_path {Path(filepath).parent / earlier[0]}" if earlier else "")
            then = (f"the previous checkpoint there is intact ({', '.join(earlier)}): free disk space and resume with "
                    f"{resume}" if earlier else "nothing was saved yet: free disk space and run the same command again")
            raise UserError(f"checkpoint.dirpath: no space left to write '{filepath}'; {then}") from err
        finally:
            if trainer.is_global_zero:
                _remove(partial)  # a failed write (disk full...) leaves the previous checkpoint and no partial file
        self._last_checkpoint_saved = filepath
        trainer.strategy.barrier("BestAndLastCheckpoint")  # no rank reads the file before it is in place


class StallAlarm(pl.Callback):
    """Says, while training runs, when a student has not left chance: a ViT on small data can stay at the loss of a
    uniform guess (ln C) for its whole schedule (docs/recipes.md: `none` under the recipe's augmentation on the
    letters). Checked at each validation once `patience` epochs have passed after the warm-up: a run is stalled when
    its validation top-1 is near chance and its validation loss fell less than `LOSS_SHARE` over the last `patience`
    epochs (a distilled run can sit near chance in top-1 for a dozen epochs while its loss falls, and then learn; a
    stalled one stays at the loss of a guess that ignores the image: ln C, or the entropy of the class shares on
    unbalanced data); said once, naming the epoch, the accuracy against chance and what to try; training goes on.
    The recipe's students that learn leave chance up to 17 epochs after the warm-up, some with a loss as flat as a
    stalled run's until then (docs/recipes.md, "A baseline that learns"): the default patience waits past that.

    Args:
        patience: epochs after the learning-rate warm-up before a run still at chance is named.
    """

    LOSS_SHARE = 0.03  # a stalled run's loss is flat; a distilled one still near chance is falling (docs/recipes.md)

    def __init__(self, patience: int = 25) -> None:
        self.patience, self.said = patience, False
        self.losses: dict[int, float] = {}  # validation loss by epoch (a resumed run starts counting again)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.said or trainer.sanity_checking or not trainer.is_global_zero:
            return
        warmup = float(getattr(pl_module.hparams, "warmup_epochs", 0.0))
        classes = int(getattr(pl_module.hparams, "num_classes", 0))
        acc, loss = trainer.callback_metrics.get("val/acc"), trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.losses[trainer.current_epoch] = float(loss)
        if acc is None or classes < 2 or trainer.current_epoch + 1 < warmup + self.patience:
            return
        chance = 1.0 / classes
        then = [value for epoch, value in sorted(self.losses.items()) if epoch <= trainer.current_epoch - self.patience]
        flat = loss is None or not then or float(loss) >= (1 - self.LOSS_SHARE) * then[-1]
        if float(acc) < chance + 0.1 * (1 - chance) and flat:
            self.said = True
            alone = getattr(pl_module, "teacher", None) is None and not getattr(pl_module.hparams, "teacher_cache", None)
            advice = ("without a teacher, the distillation recipe's augmentation (RandAugment, erasing, mixup, cutmix, "
                      "small crops) can keep it there: train it with configs/baselines/no_teacher.yaml (the teacher's "
                      "lighter augmentation), or with a teacher (model.distillation soft)" if alone else
                      "try a lower model.lr, a longer model.warmup_epochs or another seed_everything")
            say(f"stalled: val/acc {100 * float(acc):.1f}% after {trainer.current_epoch + 1} epochs is at chance "
                f"({100 * chance:.1f}% for {classes} classes); a ViT student on small data can stay there for its whole "
                f"schedule. {advice[0].upper()}{advice[1:]}")


def _refuse_diverged(trainer: pl.Trainer, filepath: str) -> None:
    """A student whose weights are NaN or inf is never saved: it would become best.ckpt, an export, predictions."""
    module = trainer.lightning_module
    student = getattr(module, "student", module)
    bad = [name for name, p in student.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"training diverged: the student's weights hold NaN or inf at epoch {trainer.current_epoch}, "
                        f"step {trainer.global_step} (e.g. {bad[0]}); '{Path(filepath).name}' was not written and the "
                        "previous checkpoints are intact: start from their weights with a lower rate (model.init_from=<last.ckpt> "
                        "--model.lr ... into another checkpoint.dirpath; a resumed run keeps its optimiser's rate)")


def _no_space(err: BaseException) -> bool:
    """Whether a failed save met a full disk or quota (an OSError's errno, or torch's writer's RuntimeError)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return "file write failed" in text or "No space left" in text or "Disk quota" in text


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()
