"""Students for DeiT distillation (Touvron et al., arXiv 2012.12877): ViTs, Swin, any timm backbone.

`Student` builds any timm classifier. A DeiT-distilled architecture
(`VisionTransformerDistilled`: a class token and a distillation token, each with its own
head) returns both heads' logits in training and their average in eval, as timm does.
A backbone without a class token (Swin, ConvNeXt, ResNet, ...) gets the same two-head
training with `distill_head=True`: a second linear head on the pooled features, as LeViT
does. Both heads read the same pooled vector, so their average is one linear layer: export
folds it into the backbone's own classifier and the result is a plain timm model.
Without either, the single head distills.
"""
from __future__ import annotations

import copy
import difflib
from functools import partial
from typing import Any, Optional, Union

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from distill.common.errors import UserError
from distill.common.ranges import HalfOpenUnitInterval, PositiveInt, plain
from students.checks import check_built, check_options, explain_build_error

__all__ = ["Student", "DEIT_VARIANTS", "check_model_name"]

# Short names for the paper's distilled students; any timm model name is accepted as well.
DEIT_VARIANTS = {
    "deit_tiny": "deit_tiny_distilled_patch16_224",
    "deit_small": "deit_small_distilled_patch16_224",
    "deit_base": "deit_base_distilled_patch16_224",
}


def check_model_name(model_name: str, option: str, aliases: tuple[str, ...] = ()) -> None:
    """Raise a one-line UserError for a name timm does not know, with close suggestions."""
    if ":" in model_name or timm.is_model(model_name):  # hf-hub:, local-dir: are resolved by timm
        return
    arch = model_name.split(".")[0]
    close = difflib.get_close_matches(arch, [*aliases, *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('pattern*')` lists the names"
    raise UserError(f"{option}: unknown timm model '{model_name}'{hint}")


def _create(model_name: str, img_size: Optional[int], **kwargs: Any) -> nn.Module:
    """Create a timm model (a DEIT_VARIANTS name or timm's); a size combination timm asserts on (or trips over)
    is a one-line UserError."""
    timm_name = DEIT_VARIANTS.get(model_name, model_name)
    try:
        return _create_sized(timm_name, img_size, **kwargs)
    except (AssertionError, IndexError, TypeError) as err:
        refusal = explain_build_error(err, model_name, img_size, kwargs, partial(_create_sized, timm_name, img_size))
        if refusal is err:
            raise
        raise refusal from err


def _create_sized(model_name: str, img_size: Optional[int], **kwargs: Any) -> nn.Module:
    """Create a timm model, giving `img_size` only to architectures that take one (ViTs do, convnets do not)."""
    if img_size is not None:
        try:
            return timm.create_model(model_name, img_size=img_size, **kwargs)
        except TypeError as err:  # e.g. "ResNet.__init__() got an unexpected keyword argument 'img_size'"
            if "img_size" not in str(err):
                raise _unsupported(model_name, err, kwargs) from err
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as err:
        raise _unsupported(model_name, err, kwargs) from err


def _unsupported(model_name: str, err: TypeError, kwargs: dict[str, Any]) -> Exception:
    """A UserError naming the size option a timm architecture does not take; any other TypeError is a bug."""
    named = [key for key in ("patch_size", "embed_dim", "depth", "num_heads", "depths", "window_size")
             if key in kwargs and f"'{key}'" in str(err)]
    if not named:
        return err
    return UserError(f"student '{model_name}' does not take {named[0]} (a {named[0]} of "
                     f"{kwargs[named[0]]!r} is set); set student.{named[0]}: null for this architecture")


class Student(nn.Module):
    """A student network with a class head and, for DeiT architectures, a distillation head.

    Args:
        num_classes: classes of the dataset (linked from the data module by the CLI).
        img_size: input resolution (linked from the data module); ignored by convnets.
        model_name: a timm model name, or deit_tiny / deit_small / deit_base for the paper's
            distilled students (`deit_*_distilled_patch16_224`).
        patch_size: patch size of a ViT; None keeps the architecture's.
        embed_dim: token width of a ViT; None keeps the architecture's.
        depth: number of transformer blocks; None keeps the architecture's.
        num_heads: attention heads per block, or per stage for Swin (e.g. [3, 6, 12, 24]);
            None keeps the architecture's.
        depths: blocks per stage of a hierarchical model (Swin), e.g. [2, 2, 6, 2].
        window_size: attention window of Swin (one for all stages, or one per stage); the
            patch grid of every stage must be a multiple of it.
        drop_path_rate: stochastic depth rate (DeiT: 0.1).
        drop_rate: dropout before the heads (DeiT: 0).
        pretrained: load timm's pretrained weights for `model_name` (downloads; online only).
        distill_head: for a backbone without a distillation token (Swin, ConvNeXt, ResNet...),
            add a distillation head on the pooled features: (class, distillation) logits in
            training, their average in eval. Ignored by DeiT architectures, which have one.
    """

    def __init__(
        self,
        num_classes: int,
        img_size: Optional[int] = None,
        model_name: str = "deit_tiny",
        patch_size: Optional[PositiveInt] = None,
        embed_dim: Optional[PositiveInt] = None,
        depth: Optional[PositiveInt] = None,
        num_heads: Optional[Union[PositiveInt, list[PositiveInt]]] = None,
        drop_path_rate: HalfOpenUnitInterval = 0.1,
        drop_rate: HalfOpenUnitInterval = 0.0,
        pretrained: bool = False,
        depths: Optional[list[PositiveInt]] = None,
        window_size: Optional[Union[PositiveInt, list[PositiveInt]]] = None,
        distill_head: bool = False,
    ) -> None:
        super().__init__()
        num_heads, depths, window_size = _plain(num_heads), _plain(depths), _plain(window_size)
        # Plain values only: stored in checkpoints so export can rebuild the student.
        self.config = plain(dict(
            num_classes=num_classes, img_size=img_size, model_name=model_name, patch_size=patch_size,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path_rate,
            drop_rate=drop_rate, pretrained=pretrained, depths=depths, window_size=window_size,
            distill_head=distill_head,
        ))
        patch_size, embed_dim, depth = self.config["patch_size"], self.config["embed_dim"], self.config["depth"]
        timm_name = DEIT_VARIANTS.get(model_name, model_name)
        check_model_name(timm_name, "student.model_name", tuple(DEIT_VARIANTS))
        arch_args = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, depths=depths,
                         window_size=window_size)
        arch_args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in arch_args.items() if v is not None}
        check_options(model_name, arch_args)
        self.model = _create(
            model_name, img_size, pretrained=pretrained, num_classes=num_classes,
            drop_path_rate=drop_path_rate, drop_rate=drop_rate, **arch_args,
        )
        check_built(self.model, model_name, img_size, window_size)
        self.distilled = isinstance(self.model, VisionTransformerDistilled)
        if self.distilled:
            self.model.set_distilled_training(True)
        self.head_dist: Optional[nn.Linear] = None
        if distill_head and not self.distilled:
            classifier = self.model.get_classifier()
            if not isinstance(classifier, nn.Linear):
                raise UserError(f"student '{model_name}': distill_head needs a linear classifier on pooled "
                                 f"features, this model's is a {type(classifier).__name__}")
            self.head_dist = nn.Linear(classifier.in_features, num_classes)
            nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
            nn.init.zeros_(self.head_dist.bias)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training: (class logits, distillation logits) with two heads; eval: their average. (B, C)"""
        if self.head_dist is None:
            return self.model(x)  # DeiT: timm returns the pair in distilled training mode, the average in eval
        cls_logits, dist_logits = self.forward_heads(x)
        return (cls_logits, dist_logits) if self.training else (cls_logits + dist_logits) / 2

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits in train and eval; a single-head student returns its logits twice."""
        if self.distilled and self.training:
            return self.model(x)  # timm returns the pair in distilled training mode
        cls_logits, dist_logits, _ = self.forward_with_tokens(x)
        return cls_logits, dist_logits

    @property
    def feature_info(self) -> list[dict]:
        """timm's feature levels of the model (a ViT: one per block), for feature imitation."""
        return list(getattr(self.model, "feature_info", None) or [])

    def forward_heads_and_features(self, x: torch.Tensor,
                                   levels: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """`forward_heads` and, from the same forward, the feature maps (B, C_i, H_i, W_i) of timm's feature levels
        `levels` (a ViT's blocks, their patch tokens on the patch grid: timm's `forward_intermediates`)."""
        taken = sorted(set(levels))  # timm returns the levels in the model's order, each once
        final, maps = self.model.forward_intermediates(x, indices=taken, output_fmt="NCHW")
        features = [maps[taken.index(level)] for level in levels]
        if self.head_dist is not None:
            pooled = self.model.forward_head(final, pre_logits=True)
            return self.model.get_classifier()(pooled), self.head_dist(pooled), features
        if self.distilled:  # (B, N+2, D): class token, distillation token, patches; timm's dropout before the heads
            cls_token, dist_token = self.model.head_drop(final[:, 0]), self.model.head_drop(final[:, 1])
            return self.model.head(cls_token), self.model.head_dist(dist_token), features
        logits = self.model.forward_head(final)
        return logits, logits, features

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(class logits, distillation logits, final class and distillation token embeddings (B, 2, D) or None).

        The tokens exist for DeiT students only (the paper follows their cosine similarity).
        """
        if self.head_dist is not None:
            pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, D)
            return self.model.get_classifier()(pooled), self.head_dist(pooled), None
        if not self.distilled:
            logits = self.model(x)
            return logits, logits, None
        tokens = self.model.forward_features(x)  # (B, N+2, D): class token, distillation token, patches
        return self.model.head(tokens[:, 0]), self.model.head_dist(tokens[:, 1]), tokens[:, :2]

    def fused_model(self) -> nn.Module:
        """The timm model alone, computing the eval output (the heads' average) with its own classifier.

        For a distillation head on pooled features, (W1 p + b1 + W2 p + b2) / 2 is one linear
        layer with the averaged weights: a copy of the backbone gets it as its classifier.
        DeiT models already average their heads in eval.
        """
        model = copy.deepcopy(self.model).eval()
        if self.head_dist is not None:
            classifier = model.get_classifier()
            with torch.no_grad():
                classifier.weight.copy_((classifier.weight + self.head_dist.weight) / 2)
                classifier.bias.copy_((classifier.bias + self.head_dist.bias) / 2)
        return model

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings are excluded from weight decay (timm's list)."""
        inner = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{name}" for name in inner}


def _plain(value: Any) -> Any:
    """Lists (YAML) and tuples alike as lists of built-in numbers: checkpoint configs stay plain data."""
    value = plain(value)
    return list(value) if isinstance(value, (list, tuple)) else value
