"""Classify a folder of images with an exported student and write the top-k to CSV.

    distill predict --export exports/student --images photos/ --out predictions.csv --top_k 5

The preprocessing (resize, crop, mean/std) is the one recorded in the export's config.json.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from distill.export import load_export

__all__ = ["predict_folder", "main"]


def predict_folder(export: str | Path, images: str | Path, out: str | Path, top_k: int = 5, batch_size: int = 32) -> int:
    """Write `out` (CSV: path, then class/probability pairs, best first); returns the image count."""
    files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"predict: no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) under '{images}'")
    model = load_export(export)
    names = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    transform = create_transform(**resolve_data_config({}, model=model))
    top_k = min(top_k, model.num_classes)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *[c for i in range(1, top_k + 1) for c in (f"class_{i}", f"prob_{i}")]])
        for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch"):
            chunk = files[start:start + batch_size]
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in chunk])
            with torch.no_grad():
                probs, indices = model(batch).softmax(-1).topk(top_k, dim=-1)
            for path, p_row, i_row in zip(chunk, probs.tolist(), indices.tolist()):
                writer.writerow([str(path), *[v for i, p in zip(i_row, p_row) for v in (names[i], f"{p:.6f}")]])
    tmp.replace(out)
    return len(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="distill predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="folder written by `distill export`")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", default="predictions.csv", help="CSV file to write")
    parser.add_argument("--top_k", type=int, default=5, help="classes per image")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    args = parser.parse_args(argv)
    count = predict_folder(args.export, args.images, args.out, args.top_k, args.batch_size)
    print(f"wrote {count} predictions to {args.out}")
