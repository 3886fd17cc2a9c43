"""Teacher forward throughput: plain fp32 against the fast path (bf16/fp16 weights + autocast,
channels-last, optionally torch.compile), with their top-1 agreement, side by side in one run.

    python benchmarks/teacher_speed.py --model regnety_160 --img-size 224 --batch 8
    python benchmarks/teacher_speed.py --model resnet10t --img-size 32 --batch 360 --data digits \\
        --weights runs/digits/teacher/checkpoints/best.ckpt   # a trained teacher on real images

Random weights unless --weights (agreement on random weights says little; speed is the same).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from teachers import Teacher


def throughput(teacher: Teacher, images: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    logits = teacher(images)  # warm-up (and, on the fast path, its fp32 agreement check)
    start = time.perf_counter()
    for _ in range(repeats):
        logits = teacher(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return repeats * images.shape[0] / (time.perf_counter() - start), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="regnety_160")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default="none", help="teacher weights (default: random)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", choices=["noise", "digits"], default="noise",
                        help="images: Gaussian noise, or the bundled digits' validation images (real agreement)")
    args = parser.parse_args()

    if args.data == "digits":
        from distill.training.datamodule import ImageDataModule
        data = ImageDataModule("digits", img_size=args.img_size, crop_pct=1.0, mixup=0, cutmix=0)
        data.setup("validate")
        images = torch.stack([data.val_set[i][0] for i in range(min(args.batch, len(data.val_set)))]).to(args.device)
    else:
        images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device,
                             generator=torch.Generator(args.device).manual_seed(0))
    classes = None if args.weights != "none" else args.num_classes
    results = {}
    for name, kwargs in (("fp32", dict(precision="32", channels_last=False)),
                         ("fast (auto)", dict(precision="auto", channels_last=True, compile=args.compile))):
        torch.manual_seed(0)  # the same random weights for both paths
        teacher = Teacher(args.model, weights=args.weights, num_classes=classes, **kwargs).to(args.device)
        speed, logits = throughput(teacher, images, args.repeats)
        results[name] = (speed, logits, teacher.fast_dtype)
    base_speed, base_logits, _ = results["fp32"]
    print(f"{args.model} at {args.img_size} px, batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"timm {timm.__version__}, {torch.get_num_threads()} threads")
    print(f"{'path':12s} {'dtype':15s} {'img/s':>8s} {'x fp32':>7s} {'top-1 agreement':>16s}")
    for name, (speed, logits, dtype) in results.items():
        agreement = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
        print(f"{name:12s} {str(dtype or torch.float32):15s} {speed:8.1f} {speed / base_speed:7.2f} {agreement:16.1%}")


if __name__ == "__main__":
    main()
