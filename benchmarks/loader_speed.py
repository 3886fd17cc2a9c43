"""Training data path throughput: this project's loader against the reference DeiT loader, side by side.

    python benchmarks/loader_speed.py                          # 2 workers, batch 64, 16 epochs a row (5 min here)
    python benchmarks/loader_speed.py --workers 8 --batch 128  # size num_workers for a GPU node

Both loaders read the same JPEG tree of ImageNet-like images (generated once into `--data`:
sizes 300-500 px a side, about 90 KB each, near ImageNet's 110 KB) with the DeiT recipe: decode,
RandomResizedCrop 224, flip, RandAugment rand-m9-mstd0.5-inc1, normalisation, random erasing
0.25 (pixel), then mixup 0.8 / cutmix 1.0 with label smoothing 0.1 on the batch. The reference
is torchvision's ImageFolder + timm's `create_transform` + timm's `Mixup` on the batch, as the
DeiT code does; this project's is `ImageDataModule` (every view seeded by (seed, epoch, image),
mixing each fixed pair with its own seeded draws, so a view can be replayed exactly), with the
mixing done on the CPU as in a CPU-only run. Every row reads the same images (whole epochs),
all rows in one process with their workers kept, epochs alternating between rows `--repeats`
times after a warm-up epoch each; the table gives each row's median images/s, per worker, the
median ratio of the project's epochs to the reference's adjacent ones, and the time the batch
mixing takes in the training process (it competes with the workers for the CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "reference": "reference: torchvision ImageFolder + timm transform",
    "project": "this project: ImageDataModule (seeded views)",
    "reference_mix": "reference + timm Mixup on the batch",
    "project_mix": "this project + per-pair mixing (exact replay)",
}
RECIPE = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel", "mixup": 0.8, "cutmix": 1.0,
          "label_smoothing": 0.1}


def make_jpegs(root: Path, images: int, classes: int) -> None:
    """An ImageFolder tree (train/ and a small val/) of smooth random pictures with noise, JPEG quality 92."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            width, height = int(rng.integers(300, 501)), int(rng.integers(300, 501))
            y, x = np.mgrid[0:height, 0:width] / max(width, height)
            phases = rng.uniform(0, 6.3, (3, 3))
            picture = np.stack([np.sin(x * p[0] * 9 + y * p[1] * 7 + p[2]) for p in phases], -1) * 90 + 128
            picture += rng.normal(0, 16, picture.shape)
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=92)


def reference_loader(args: argparse.Namespace):
    import torch
    from timm.data import Mixup, create_transform
    from torchvision.datasets import ImageFolder
    transform = create_transform(args.img_size, is_training=True, auto_augment=RECIPE["auto_augment"],
                                 re_prob=RECIPE["re_prob"], re_mode=RECIPE["re_mode"], interpolation="bicubic")
    dataset = ImageFolder(str(args.data / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         pin_memory=torch.cuda.is_available())  # as the project's loader
    mixup = Mixup(mixup_alpha=RECIPE["mixup"], cutmix_alpha=RECIPE["cutmix"], label_smoothing=RECIPE["label_smoothing"],
                  num_classes=len(dataset.classes))
    return loader, (lambda batch: mixup(*batch))


def project_loader(args: argparse.Namespace):
    from distill.training.datamodule import ImageDataModule
    data = ImageDataModule(str(args.data), img_size=args.img_size, batch_size=args.batch, num_workers=args.workers,
                           **RECIPE)
    data.setup("fit")

    def mix(batch):
        return data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
    return data.train_dataloader(), mix


def epoch_speed(loader, mix) -> tuple[float, float]:
    """Images/s of one whole epoch through `loader` with `mix` (if any) applied to each batch in this
    process, and the milliseconds per batch spent in `mix`."""
    if hasattr(loader.sampler, "set_epoch"):  # the project's: new views every epoch, as in training
        loader.sampler.set_epoch(loader.sampler.epoch + 1)
    start, images, batches, mixing = time.perf_counter(), 0, 0, 0.0
    for batch in loader:
        if mix is not None:
            mixing -= time.perf_counter()
            batch = mix(batch)
            mixing += time.perf_counter()
        images += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch.images)
        batches += 1
    return images / (time.perf_counter() - start), mixing / batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bench_jpegs"),
                        help="the JPEG tree (made here when missing)")
    parser.add_argument("--images", type=int, default=1024, help="training images to make")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=16, help="timed epochs of every row, alternating")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows of: " + ", ".join(ROWS))
    args = parser.parse_args()
    rows = args.rows.split(",")
    if any(row not in ROWS for row in rows):
        parser.error(f"--rows: one or more of {', '.join(ROWS)}, got '{args.rows}'")
    if not (args.data / "train").is_dir():
        print(f"making {args.images} JPEGs in {args.data}", file=sys.stderr, flush=True)
        make_jpegs(args.data, args.images, args.classes)
    sizes = [p.stat().st_size for p in (args.data / "train").rglob("*.jpg")]
    if len(sizes) < 4 * args.batch:
        parser.error(f"--data: {len(sizes)} training JPEGs, fewer than 4 batches of {args.batch}")

    import torch
    torch.manual_seed(0)
    loaders = {}
    for row in rows:  # every loader keeps its workers: an idle one waits while another is timed
        loader, mix = (project_loader if row.startswith("project") else reference_loader)(args)
        loaders[row] = (loader, mix if row.endswith("_mix") else None)
        epoch_speed(*loaders[row])  # warm-up epoch: workers start, files enter the page cache
    speeds: dict[str, list[float]] = {row: [] for row in rows}
    mixing: dict[str, list[float]] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        for row in rows if repeat % 2 == 0 else rows[::-1]:  # alternate, so drift hits every row alike
            speed, mix_ms = epoch_speed(*loaders[row])
            speeds[row].append(speed)
            mixing[row].append(mix_ms)
            print(f"  {row}: {speed:.1f} img/s", file=sys.stderr, flush=True)

    import timm
    print(f"\n{len(sizes)} JPEGs ({sum(sizes) / len(sizes) / 1024:.0f} KB mean), {args.img_size} px, batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, {args.repeats} timed epochs per row after one, alternating; "
          f"torch {torch.__version__}, timm {timm.__version__}")
    print("| loader | img/s (median, min-max) | img/s per worker | project / reference (median of adjacent epochs) "
          "| mixing ms/batch |")
    print("|---|--:|--:|--:|--:|")
    for row in rows:
        median = statistics.median(speeds[row])
        other = {"project": "reference", "project_mix": "reference_mix"}.get(row)
        ratio = (f"{statistics.median(a / b for a, b in zip(speeds[row], speeds[other])):.2f}"
                 if other in speeds else "")
        per_worker = f"{median / args.workers:.1f}" if args.workers else "-"
        mix_ms = f"{statistics.median(mixing[row]):.1f}" if row.endswith("_mix") else ""
        print(f"| {ROWS[row]} | {median:.1f} ({min(speeds[row]):.1f}-{max(speeds[row]):.1f}) | {per_worker} | {ratio} "
              f"| {mix_ms} |")


if __name__ == "__main__":
    main()
