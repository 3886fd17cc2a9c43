"""Start a student from another stage's weights, at another resolution.

DeiT fine-tunes at 384 px from a 224 px model by resampling the patch-grid position
embeddings (bicubic) and keeping the prefix tokens' embeddings as they are; Swin, when its
attention window grows with the image, resizes its relative-position bias tables. timm's
`resample_abs_pos_embed` and `resize_rel_pos_bias_table` do the resampling; this adds the
rest of a stage hand-over: heads are kept when the class count matches and re-initialised
otherwise. (Swin's attention masks and position indices are rebuilt by the new model.)
"""
from __future__ import annotations

import warnings

import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import nn

from distill.common.checkpoints import shapes_of, state_mismatch
from distill.common.errors import UserError

__all__ = ["adapt_student_state"]

HEAD_KEYS = ("head.", "head_dist.", "fc.", "classifier.")


def adapt_student_state(state: dict[str, torch.Tensor], student: nn.Module) -> dict[str, torch.Tensor]:
    """Return `state` (keys of `student.state_dict()`) fitted to `student`'s grid and classes."""
    own = student.state_dict()
    mismatch = state_mismatch(shapes_of(own), shapes_of(state), shapes=False)  # other shapes: resampled below
    if mismatch:
        raise UserError(f"the checkpoint's student does not match this student: {mismatch}")
    adapted, dropped = {}, []
    for key, value in state.items():
        if value.shape == own[key].shape:
            adapted[key] = value
        elif key.endswith("pos_embed"):  # (1, prefix + old_h * old_w, D) -> (1, prefix + h * w, D)
            model = getattr(student, "model", student)
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            adapted[key] = resample_abs_pos_embed(value, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
        elif key.endswith("relative_position_bias_table"):  # ((2w-1)^2, heads) for a window w
            attention = student.get_submodule(key.rsplit(".", 1)[0])
            adapted[key] = resize_rel_pos_bias_table(value, new_window_size=tuple(attention.window_size),
                                                     new_bias_shape=tuple(own[key].shape))
        elif any(part in key for part in HEAD_KEYS):
            adapted[key] = own[key]  # a new class count: the new head starts from its initialisation
            dropped.append(key)
        else:
            raise UserError(f"the checkpoint's '{key}' has shape {tuple(value.shape)}, this student's {tuple(own[key].shape)}")
    if dropped:
        warnings.warn(f"class count changed: heads re-initialised ({', '.join(dropped)})", stacklevel=2)
    return adapted
