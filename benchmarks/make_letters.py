"""A small ImageFolder the recipe was not tuned on: the 26 letters A-Z, rendered in the fonts matplotlib ships.

    python benchmarks/make_letters.py --out data/letters [--train 40] [--val 15] [--size 40] [--seed 0]

Each image is one capital letter in one of about twenty fonts (DejaVu Sans / Serif / Mono, STIX,
Computer Modern; regular, bold, italic), rotated up to 15 degrees, scaled, shifted, in a random
colour on a random background with noise: `OUT/train/<letter>/*.png` and `OUT/val/<letter>/*.png`
(26 classes; 1040 training and 390 validation images by default). It stands in for "a user's own
small dataset" when checking that a config meant for any ImageFolder does not only work on
digits (`distill compare --config configs/distill.yaml --data.dataset data/letters ...`; train
its teacher first with `configs/teacher.yaml` and the same `--data.dataset`).
"""
from __future__ import annotations

import argparse
import string
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSerif",
         "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "DejaVuSansMono", "DejaVuSansMono-Bold",
         "DejaVuSansMono-Oblique", "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
         "cmr10", "cmss10", "cmti10", "cmtt10", "cmb10"]


def render(letter: str, font: Path, size: int, rng: np.random.Generator, plain: bool = False) -> Image.Image:
    """One letter: random font size, rotation, position, colours and noise (`plain`: black on white, no noise),
    on a size x size canvas."""
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(90, 167, 3) * rng.choice([-1, 1], 3)) % 256  # readable contrast
    if plain:
        background, foreground = np.array([255, 255, 255]), np.array([0, 0, 0])
    canvas = Image.new("RGB", (2 * size, 2 * size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)
    face = ImageFont.truetype(str(font), int(size * rng.uniform(0.55, 0.9)))
    draw.text((size, size), letter, fill=tuple(int(c) for c in foreground), font=face, anchor="mm")
    canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC,
                           fillcolor=tuple(int(c) for c in background))
    dx, dy = rng.integers(-size // 8, size // 8 + 1, 2)
    image = canvas.crop((size // 2 + dx, size // 2 + dy, size // 2 + dx + size, size // 2 + dy + size))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 0 if plain else 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_letters(out: Path, train: int = 40, val: int = 15, size: int = 40, seed: int = 0, plain: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    fonts = [FONT_DIR / f"{name}.ttf" for name in FONTS if (FONT_DIR / f"{name}.ttf").is_file()]
    for split, count in (("train", train), ("val", val)):
        if count == 0:  # --train 0: a held-out folder, val/ alone
            continue
        for letter in string.ascii_uppercase:
            folder = out / split / letter
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                font = fonts[int(rng.integers(len(fonts)))]
                render(letter, font, size, rng, plain).save(folder / f"{i:03d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (train/ and val/ inside)")
    parser.add_argument("--train", type=int, default=40, help="training images per letter; 0 writes val/ alone "
                        "(a held-out test set: --train 0 --val 100 --seed 1, a seed the training folder did not use)")
    parser.add_argument("--val", type=int, default=15, help="validation images per letter")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="black letters on white, no noise (colours are random "
                        "otherwise): tells colour invariance apart from shape learning")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: --out '{out}' exists; choose another folder")
    if args.train < 0 or min(args.val, args.size) < 1:
        raise SystemExit("error: --val and --size must be 1 or more, --train 0 or more")
    make_letters(out, args.train, args.val, args.size, args.seed, args.plain)
    print(f"wrote {26 * (args.train + args.val)} images to {out}")


if __name__ == "__main__":
    main()
