"""ViT students for DeiT distillation (Touvron et al., arXiv 2012.12877).

`Student` builds any timm classifier. A DeiT-distilled architecture
(`VisionTransformerDistilled`: a class token and a distillation token, each with its own
head) returns both heads' logits in training and their average in eval, as timm does. Any
other timm classifier is accepted too and then distills through its single head.
"""
from __future__ import annotations

import difflib
from typing import Any, Optional

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn

__all__ = ["Student", "DEIT_VARIANTS", "check_model_name"]

# Short names for the paper's distilled students; any timm model name is accepted as well.
DEIT_VARIANTS = {
    "deit_tiny": "deit_tiny_distilled_patch16_224",
    "deit_small": "deit_small_distilled_patch16_224",
    "deit_base": "deit_base_distilled_patch16_224",
}


def check_model_name(model_name: str, option: str, aliases: tuple[str, ...] = ()) -> None:
    """Raise a one-line ValueError for a name timm does not know, with close suggestions."""
    if ":" in model_name or timm.is_model(model_name):  # hf-hub:, local-dir: are resolved by timm
        return
    arch = model_name.split(".")[0]
    close = difflib.get_close_matches(arch, [*aliases, *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('pattern*')` lists the names"
    raise ValueError(f"{option}: unknown timm model '{model_name}'{hint}")


def _create(model_name: str, img_size: Optional[int], **kwargs: Any) -> nn.Module:
    """Create a timm model, giving `img_size` only to architectures that take one (ViTs do, convnets do not)."""
    if img_size is not None:
        try:
            return timm.create_model(model_name, img_size=img_size, **kwargs)
        except TypeError as err:  # e.g. "ResNet.__init__() got an unexpected keyword argument 'img_size'"
            if "img_size" not in str(err):
                raise
    return timm.create_model(model_name, **kwargs)


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
        num_heads: attention heads per block; None keeps the architecture's.
        drop_path_rate: stochastic depth rate (DeiT: 0.1).
        drop_rate: dropout before the heads (DeiT: 0).
        pretrained: load timm's pretrained weights for `model_name` (downloads; online only).
    """

    def __init__(
        self,
        num_classes: int,
        img_size: Optional[int] = None,
        model_name: str = "deit_tiny",
        patch_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        # Plain values only: stored in checkpoints so export can rebuild the student.
        self.config = dict(
            num_classes=num_classes, img_size=img_size, model_name=model_name, patch_size=patch_size,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path_rate,
            drop_rate=drop_rate, pretrained=pretrained,
        )
        timm_name = DEIT_VARIANTS.get(model_name, model_name)
        check_model_name(timm_name, "student.model_name", tuple(DEIT_VARIANTS))
        vit_args = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        vit_args = {k: v for k, v in vit_args.items() if v is not None}
        if embed_dim is not None and num_heads is not None and embed_dim % num_heads:
            raise ValueError(f"student: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.model = _create(
            timm_name, img_size, pretrained=pretrained, num_classes=num_classes,
            drop_path_rate=drop_path_rate, drop_rate=drop_rate, **vit_args,
        )
        _check_patch_grid(self.model, model_name)
        self.distilled = isinstance(self.model, VisionTransformerDistilled)
        if self.distilled:
            self.model.set_distilled_training(True)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training: (class logits, distillation logits) for DeiT; eval: their average. (B, C)"""
        return self.model(x)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits in train and eval; a single-head student returns its logits twice."""
        if not self.distilled:
            logits = self.model(x)
            return logits, logits
        if self.training:
            return self.model(x)  # timm returns the pair in distilled training mode
        tokens = self.model.forward_features(x)  # (B, N+2, D): class token, distillation token, patches
        return self.model.head(tokens[:, 0]), self.model.head_dist(tokens[:, 1])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings are excluded from weight decay (timm's list)."""
        inner = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{name}" for name in inner}


def _check_patch_grid(model: nn.Module, model_name: str) -> None:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "img_size", None) is None:
        return
    img, patch = tuple(patch_embed.img_size), tuple(patch_embed.patch_size)
    if any(i % p for i, p in zip(img, patch)):
        raise ValueError(
            f"student '{model_name}': image size {img[0]} is not divisible by patch size {patch[0]}; "
            f"use an image size that is a multiple of {patch[0]} (data.img_size) or another student.patch_size"
        )
