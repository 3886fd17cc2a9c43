"""Can an architecture learn a dataset at all? Train it without augmentation or teacher and watch both losses.

    python benchmarks/fit_probe.py --data data/letters --model deit_tiny_distilled_patch16_224 \\
        --model-args '{"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4}'
    python benchmarks/fit_probe.py --data data/letters --model resnet10t

A diagnostic for a student that will not learn a user's data (docs/recipes.md, "On data it was
not tuned on"): the whole ImageFolder (train/ and val/) is read once into memory at --img-size,
normalised with ImageNet's mean and std, and the model trained by a plain loop (AdamW, weight
decay 0.05, linear warmup over 3 epochs then cosine, batch 64, one seed) with no augmentation,
no mixing, no teacher. Every 10 epochs it prints the training loss and the validation top-1. A
training loss that falls to near 0 while the validation top-1 stays near chance is
memorisation: the architecture does not generalise from this much data, and neither a longer
schedule nor a teacher will fix that alone. A training loss that stays near ln(classes) is an
optimisation problem (learning rate, shape). `--conv-stem` replaces a ViT's patch projection by
three 3x3 stride-2 convolutions with batch norm and ReLU (Xiao et al. 2021, "Early convolutions
help transformers see better"; patch size 8), to measure what a convolutional stem would add.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


def load(split: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((split / name).glob("*")):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                picture = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
                images.append(np.asarray(picture, np.float32) / 255)
                labels.append(index)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std, torch.tensor(labels), len(classes)


def conv_stem(width: int) -> nn.Module:
    """Three 3x3 stride-2 convolutions (8x downsampling, as patch 8) with batch norm and ReLU, then a 1x1 projection."""
    layers, channels = [], 3
    for out in (width // 4, width // 2, width):
        layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(width, width, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder with train/ and val/")
    parser.add_argument("--model", required=True, help="a timm model name")
    parser.add_argument("--model-args", default="{}", help="JSON of timm.create_model arguments")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conv-stem", action="store_true", help="a convolutional stem instead of the patch projection")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_x, train_y, classes = load(args.data / "train", args.img_size)
    val_x, val_y, _ = load(args.data / "val", args.img_size)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=classes, **json.loads(args.model_args))
    if args.conv_stem:
        model.patch_embed.proj = conv_stem(model.embed_dim)
    print(f"{args.model} {args.model_args}{' + conv stem' if args.conv_stem else ''}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_y)} training and "
          f"{len(val_y)} validation images, {classes} classes (chance {100 / classes:.2f}%, ln {math.log(classes):.2f})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    per_epoch = math.ceil(len(train_y) / 64)
    total, step, began = args.epochs * per_epoch, 0, time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order, summed = torch.randperm(len(train_y)), 0.0
        for start in range(0, len(train_y), 64):
            batch = order[start:start + 64]
            scale = min(1.0, (step + 1) / (3 * per_epoch)) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = args.lr * scale
            logits = model(train_x[batch])
            logits = logits[0] if isinstance(logits, tuple) else logits  # a distilled ViT: its class head
            loss = F.cross_entropy(logits, train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            summed += loss.item() * len(batch)
        if epoch % 10 == 0 or epoch == args.epochs:
            model.eval()
            with torch.no_grad():
                top1 = (model(val_x).argmax(1) == val_y).float().mean().item()
            print(f"epoch {epoch:4d}  training loss {summed / len(train_y):.3f}  validation top-1 {100 * top1:.2f}%  "
                  f"({time.time() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
