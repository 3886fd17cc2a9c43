"""Where a training step's targets come from, chosen once when the module is built: no teacher (`none`), the live
teacher, the live teacher with its feature maps (feature imitation: one forward of each), or the teacher cache
(verified against the live teacher on a fraction of batches). Each source returns the teacher's logits (or None),
the student's (class, distillation) logits and the feature-imitation term (or None).

`TeacherTargets` is a part of `DistillationModule` (distill/training/module.py), kept in its own file so that the
module reads as DeiT's engine does: targets, student, loss, record.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from pytorch_lightning.utilities import rank_zero_warn

from distill.cache.targets import cached_teacher_logits, view_checksum
from distill.common.console import say
from distill.common.errors import UserError
from distill.common.seeding import global_seed, sample_seed
from distill.data.batch import TrainingBatch
from distill.training.step_logging import host_value

__all__ = ["Outputs", "TeacherTargets"]

Outputs = tuple[Optional[torch.Tensor], tuple[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class TeacherTargets:
    """The targets' sources of `DistillationModule` (which holds `loss`, `teacher`, `imitation`, `student`)."""

    def _choose_forward(self) -> Callable[[TrainingBatch, int], Outputs]:
        if not self.loss.needs_teacher:
            return self._without_teacher
        if self.imitation is not None:
            return self._live_teacher_with_features
        return self._cached_teacher if self.hparams.teacher_cache else self._live_teacher

    def _heads(self) -> Callable:
        return self._compiled_heads or (self.student.forward_heads if self.imitation is None
                                        else self.student.forward_heads_and_features)

    def _without_teacher(self, batch: TrainingBatch, batch_idx: int) -> Outputs:
        return None, self._heads()(batch.images), None

    def _live_teacher(self, batch: TrainingBatch, batch_idx: int) -> Outputs:
        return self.teacher(batch.images), self._heads()(batch.images), None

    def _live_teacher_with_features(self, batch: TrainingBatch, batch_idx: int) -> Outputs:
        return self.imitation.step(self.teacher, self._heads(), batch.images)  # one forward of each

    def _cached_teacher(self, batch: TrainingBatch, batch_idx: int) -> Outputs:
        if not batch.cached:
            raise UserError("model.teacher_cache is set but the training batches carry no cached teacher outputs; "
                            "set data.teacher_cache (the two are linked by the distill CLI)")
        teacher_logits = cached_teacher_logits(batch.teacher_index, batch.teacher_prob, self.hparams.num_classes)
        self._verify_cache(batch.images, teacher_logits, batch.checksum, batch_idx)
        return teacher_logits, self._heads()(batch.images), None

    def _say_fast_path_once(self) -> None:
        if self.teacher is not None and not self._fast_path_logged and self.teacher.fast_agreement is not None:
            self._fast_path_logged = True
            say(f"Teacher fast path: {self.teacher.fast_dtype or 'fp32 (fell back)'}; top-1 agreement with "
                f"fp32 on its first batch {self.teacher.fast_agreement:.1%}")
            self.log("train/teacher_fast_agreement", host_value(self.teacher.fast_agreement), on_step=True, on_epoch=False)

    def _verify_cache(self, images: torch.Tensor, cached: torch.Tensor, checksum: torch.Tensor, batch_idx: int) -> None:
        """On a `teacher_cache_verify` fraction of batches: live teacher vs cache, replayed view vs cached view."""
        fraction = self.hparams.teacher_cache_verify
        # the same batch indices on every rank: the logged values are all-reduced (sync_dist) as they are logged
        if not fraction or sample_seed(global_seed(), self.current_epoch, batch_idx, 4) >= fraction * 2**32:
            return
        live = self.teacher(images)
        agreement = (live.argmax(-1) == cached.argmax(-1)).float().mean()
        expected = checksum.cpu().view(torch.float64)  # float64 bits carried as int64 (see distill.data.batch)
        match = torch.isclose(view_checksum(images).cpu(), expected, rtol=1e-9, atol=1e-6).to(images.device)
        self.log("train/cache_agreement", agreement, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/cache_view_match", match.double().mean().float(), on_step=True, on_epoch=True, sync_dist=True)
        if not bool(match.all()) and not self._view_mismatch_warned:
            self._view_mismatch_warned = True
            rank_zero_warn(f"data.teacher_cache: {int((~match).sum())} of {len(match)} training views differ from the "
                           "views the cache was built from (the transform code or a library version changed since): "
                           "the cached targets label other images; rebuild the cache with distill cache-teacher")
