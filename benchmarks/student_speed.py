"""Which student serves at least as fast as its teacher: students of the recipe's architecture at several depths and
widths against a timm teacher, in ONNX Runtime on this machine (fp32, batch 1 and 64, one thread, side by side, as
`distill compare --plot` measures), with their parameters and multiply-adds.

    python benchmarks/student_speed.py                                   # the recipe's student at 32 px vs ResNet-10t
    python benchmarks/student_speed.py --sizes 6x128,3x128,4x96 --teacher resnet18 --classes 100

DeiT compares a student with its teacher at equal throughput (its Figure 1): a size whose "x teacher" is 1.00 or more
at both batch sizes counts; train it with `--model.student.init_args.depth D --model.student.init_args.embed_dim W
--model.student.init_args.num_heads H` (docs/recipes.md, "A student that serves faster than its teacher").
Random weights: the speed does not depend on them.
"""
from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import students  # registers the recipe's student with timm
from distill.deploy.throughput import architecture, measure_throughput


def student(depth: int, width: int, heads: int, patch: int, classes: int, img_size: int) -> torch.nn.Module:
    """The recipe's student (configs/distill.yaml: the DeiT token student on a convolutional stem) at a size."""
    return timm.create_model("deit_tiny_r_s16_p8_distilled_224", img_size=img_size, patch_size=patch, embed_dim=width,
                             depth=depth, num_heads=heads, num_classes=classes)


def multiply_adds(model: torch.nn.Module, img_size: int) -> float:
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="6x128,4x128,3x128,2x128,4x96,3x96",
                        help="students as DEPTHxWIDTH, comma-separated (heads: width / 32)")
    parser.add_argument("--teacher", default="resnet10t")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=2, help="the patch size on the stem's features (the recipe's 2)")
    parser.add_argument("--classes", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {}
    for size in args.sizes.split(","):
        depth, width = (int(x) for x in size.lower().split("x"))
        models[f"student depth {depth}, width {width}"] = student(depth, width, max(1, width // 32), args.patch,
                                                                   args.classes, args.img_size)
    models[f"teacher {args.teacher}"] = architecture(args.teacher, args.classes)
    speed = measure_throughput({name: [(model, args.img_size)] for name, model in models.items()},
                               repeats=args.repeats)
    teacher = speed[f"teacher {args.teacher}"]
    print(f"ONNX Runtime fp32, one thread, {args.img_size} px, {args.classes} classes, median of {args.repeats} "
          "side-by-side repeats\n")
    print("| model | params | multiply-adds | images/s, batch 1 | x teacher | images/s, batch 64 | x teacher |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {multiply_adds(model, args.img_size) / 1e6:.1f}M | "
              f"{speed[name][1]:.0f} | {speed[name][1] / teacher[1]:.2f} | {speed[name][64]:.0f} | "
              f"{speed[name][64] / teacher[64]:.2f} |")


if __name__ == "__main__":
    main()
