"""A second small ImageFolder no recipe was tuned on: 24 classes, each a shape in a fill pattern, in clutter.

    python benchmarks/make_shapes.py --out data/shapes [--train 40] [--val 15] [--size 40] [--seed 0]

A class is one of 8 upright shapes (circle, square, triangle, star, cross, crescent, arrow, heart) in one of 3
fills (solid, striped, dotted): 24 classes, `OUT/train/<shape>_<fill>/*.png` and `OUT/val/...` (960 training
and 360 validation images by default). Each image draws its shape at a random size, tilt (up to 25 degrees) and position,
in a random colour on a random background, with one or two distractor strokes and pixel noise.

How it differs from `make_letters.py` (26 letters in twenty fonts): no glyphs and no fonts, so nothing a
font renderer or a letter-shaped prior helps with; a class is a conjunction of two attributes (the same
shape in another fill is another class, the same fill on another shape too), so a model must see both
outline and texture; and the clutter crosses the shape. It stands in, like the letters, for "a user's
own small dataset": train its teacher with `configs/teacher.yaml --data.dataset data/shapes`, then distil.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent", "arrow", "heart")
FILLS = ("solid", "striped", "dotted")
CLASSES = tuple(f"{shape}_{fill}" for shape in SHAPES for fill in FILLS)


def _outline(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """The shape's polygon around (0, 0), rotated by `angle` (curves: polygons of many sides)."""
    def ring(sides: int, r: float, turn: float = 0.0) -> list[tuple[float, float]]:
        return [(r * math.cos(angle + turn + 2 * math.pi * i / sides), r * math.sin(angle + turn + 2 * math.pi * i / sides))
                for i in range(sides)]
    if shape == "circle":
        return ring(48, radius)
    if shape == "square":
        return ring(4, radius, math.pi / 4)
    if shape == "triangle":
        return ring(3, radius)
    if shape == "star":
        outer, inner = ring(5, radius), ring(5, radius * 0.45, math.pi / 5)
        return [point for pair in zip(outer, inner) for point in pair]
    cos, sin = math.cos(angle), math.sin(angle)
    if shape in ("cross", "arrow", "heart"):
        w = radius * 0.38
        if shape == "cross":
            points = [(w, w), (radius, w), (radius, -w), (w, -w), (w, -radius), (-w, -radius), (-w, -w), (-radius, -w),
                      (-radius, w), (-w, w), (-w, radius), (w, radius)]
        elif shape == "arrow":  # a shaft and a head, pointing along +x before the rotation
            points = [(-radius, -w * 0.7), (0.1 * radius, -w * 0.7), (0.1 * radius, -radius * 0.75), (radius, 0),
                      (0.1 * radius, radius * 0.75), (0.1 * radius, w * 0.7), (-radius, w * 0.7)]
        else:  # the classic heart curve, scaled to the radius, lying along +x as the arrow does
            points = [(radius / 17 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)),
                       radius / 17 * 16 * math.sin(t) ** 3)
                      for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
        return [(x * cos - y * sin, x * sin + y * cos) for x, y in points]
    # crescent: the outer arc, then an inner arc of a circle shifted sideways, back
    outer = [(radius * math.cos(angle + t), radius * math.sin(angle + t))
             for t in np.linspace(-0.75 * math.pi, 0.75 * math.pi, 36)]
    shift, inner_r = radius * 0.55, radius * 0.85
    inner = [(shift * math.cos(angle) + inner_r * math.cos(angle + t), shift * math.sin(angle) + inner_r * math.sin(angle + t))
             for t in np.linspace(0.62 * math.pi, -0.62 * math.pi, 36)]
    return outer + inner


def _fill_mask(fill: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Where the fill paints, as a boolean (size, size) mask before the shape cuts it."""
    if fill == "solid":
        return np.ones((size, size), dtype=bool)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(6.0, 8.0)  # at least 4.8 px at the recipes' 32 px
    if fill == "striped":
        return (np.mod(x * math.cos(theta) + y * math.sin(theta), period) < period / 2)
    u, v = x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    return du * du + dv * dv < (period * 0.3) ** 2


def render(shape: str, fill: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of the class (shape, fill) on a size x size canvas."""
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(90, 167, 3) * rng.choice([-1, 1], 3)) % 256  # readable contrast
    radius = size * rng.uniform(0.28, 0.42)
    centre = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    angle = math.radians(rng.uniform(-25, 25)) - math.pi / 2  # upright (the arrow points up), tilted up to 25 degrees
    points = [(centre[0] + x, centre[1] + y) for x, y in _outline(shape, radius, angle)]
    mask_image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_image).polygon(points, fill=255)
    inside = np.asarray(mask_image) > 127
    edge = Image.new("L", (size, size), 0)
    ImageDraw.Draw(edge).polygon(points, outline=255, width=1)
    painted = (inside & _fill_mask(fill, size, rng)) | (np.asarray(edge) > 127)
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[...] = background
    pixels[painted] = foreground
    canvas = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):  # distractor strokes in a third colour
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        start, end = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        draw.line([tuple(start), tuple(end)], fill=colour, width=int(rng.integers(1, 3)))
    noisy = np.asarray(canvas).astype(np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_shapes(out: Path, train: int = 40, val: int = 15, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        if count == 0:  # --train 0: a held-out folder, val/ alone
            continue
        for name in CLASSES:
            shape, fill = name.split("_")
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                render(shape, fill, size, rng).save(folder / f"{i:03d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (train/ and val/ inside)")
    parser.add_argument("--train", type=int, default=40, help="training images per class; 0 writes val/ alone "
                        "(a held-out test set: --train 0 --val 100 --seed 1, a seed the training folder did not use)")
    parser.add_argument("--val", type=int, default=15, help="validation images per class")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: --out '{out}' exists; choose another folder")
    if args.train < 0 or min(args.val, args.size) < 1:
        raise SystemExit("error: --val and --size must be 1 or more, --train 0 or more")
    make_shapes(out, args.train, args.val, args.size, args.seed)
    print(f"wrote {len(CLASSES) * (args.train + args.val)} images of {len(CLASSES)} classes to {out}")


if __name__ == "__main__":
    main()
