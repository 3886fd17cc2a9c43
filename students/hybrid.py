"""Hybrid DeiT students: a convolutional stem feeding a ViT with a class token and a distillation token.

The stem of Xiao et al. 2021 ("Early convolutions help transformers see better"; timm's
`vit_tiny_r_s16_p8_224`: a 7x7 stride-2 convolution, group norm, ReLU and a 3x3 stride-2 max-pool,
so 4x fewer pixels a side) under the distillation token of DeiT (Touvron et al. 2021,
"distillation through attention"): both heads in training, their average in eval.

Not a fork: timm's `VisionTransformerDistilled` passes its keyword arguments to
`VisionTransformer`, whose `embed_layer` takes timm's `HybridEmbed` around any convolutional
backbone. timm's own hybrid factory builds a plain `VisionTransformer`, which is why no registered
hybrid has the token; the one here is registered with timm's `register_model` when `students` is
imported, so `timm.create_model('local-dir:EXPORT', pretrained=True)` rebuilds an export of it in
any program that has done `import students`.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import HybridEmbed, StdConv2dSame
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnetv2 import create_resnetv2_stem

__all__ = ["deit_tiny_r_s16_p8_distilled_224"]

default_cfgs = generate_default_cfgs({
    # no published weights: trained by this project's recipes (configs/distill.yaml)
    "deit_tiny_r_s16_p8_distilled_224": {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.backbone.conv", "classifier": ("head", "head_dist"),
    },
})


def _resnet_stem(in_chans: int = 3, **kwargs: Any) -> Any:
    """The ResNet-v2 stem of timm's `vit_*_r_*` hybrids ("same" padding, weight-standardised convolution)."""
    return create_resnetv2_stem(in_chans, stem_type="same", preact=False, conv_layer=partial(StdConv2dSame, eps=1e-8))


@register_model
def deit_tiny_r_s16_p8_distilled_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """ResNet stem + DeiT-Ti with a class and a distillation token, patch 8 on the stem's features @ 224 px.

    The recipe resizes it for small images (configs/distill.yaml: patch 2, width 128, depth 6, 4 heads).
    """
    model_args = dict(patch_size=8, embed_dim=192, depth=12, num_heads=3)
    embed_layer = partial(HybridEmbed, backbone=_resnet_stem(kwargs.get("in_chans", 3)))
    return build_model_with_cfg(
        VisionTransformerDistilled, "deit_tiny_r_s16_p8_distilled_224", pretrained,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **dict(model_args, embed_layer=embed_layer, **kwargs),
    )
