"""Classify a folder of images with an exported student and write the top-k to CSV.

    distill predict --export exports/student --images photos/ --out predictions.csv --top_k 5

The preprocessing (resize, crop, mean/std) is the one recorded in the export's config.json;
images are read as training reads them (`distill.data.images.load_image`: odd modes converted by
their range, hidden files skipped). An unreadable image does not stop the run: its row holds
the reason in the `error` column and the end of the run counts them. The CSV is written
beside its target and renamed into place when complete; an existing CSV is replaced only
with --overwrite.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from distill.common.commandline import call, command
from distill.common.errors import UserError
from distill.common.files import OutputLock, lock_path, write_atomically, writing
from distill.data.images import IMG_EXTENSIONS, UnreadableImage, left_out, list_images, load_image
from distill.common.ranges import PositiveInt
from distill.deploy.inference import best_classes, export_transform, label_names, load_export

__all__ = ["predict_folder", "main"]


def predict_folder(export: str | Path, images: str | Path, out: str | Path = "predictions.csv", top_k: PositiveInt = 5,
                   batch_size: PositiveInt = 32, overwrite: bool = False) -> tuple[int, int]:
    """Write `out` (CSV: path, class/probability pairs best first, error); returns (images, unreadable).

    Args:
        export: folder written by `distill export`
        images: folder of images (searched recursively; hidden entries skipped)
        out: CSV file to write
        top_k: classes per image
        batch_size: images per forward pass
        overwrite: replace an existing --out file
    """
    assert top_k >= 1 and batch_size >= 1, (top_k, batch_size)  # PositiveInt on the command line
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise UserError(f"predict --images: '{images}' is not a folder")
    if out.is_dir():
        raise UserError(f"predict --out: '{out}' is a folder; give the path of a .csv file to write")
    if out.exists() and not overwrite:
        raise UserError(f"predict --out: '{out}' exists; pass --overwrite to replace it, or choose another --out")
    model = load_export(export)  # before the scan: a wrong --export is named at once, however large the folder
    others: list[Path] = []
    files = list_images(images, others)
    if not files:
        raise UserError(f"predict --images: no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) under '{images}'")
    if others:
        print(f"predict: {left_out(others, images)}", file=sys.stderr)
    names, transform = label_names(model), export_transform(model)
    top_k = min(top_k, model.num_classes)
    failed = 0
    with (OutputLock(lock_path(out), f"predict --out '{out}'"), writing(out, "predict --out"),
          write_atomically(out, ".tmp") as partial):
        with partial.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", *[c for i in range(1, top_k + 1) for c in (f"class_{i}", f"prob_{i}")], "error"])
            for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch"):
                failed += _predict_batch(model, transform, files[start:start + batch_size], names, top_k, writer)
    return len(files), failed


def _predict_batch(model: torch.nn.Module, transform, chunk: list[Path], names: list[str], k: int, writer) -> int:
    """One CSV row per file of `chunk`; returns how many could not be read."""
    tensors, readable, errors = [], [], {}
    for path in chunk:
        try:
            tensors.append(transform(load_image(path)))
            readable.append(path)
        except UnreadableImage as err:
            errors[path] = str(err)
    rows = {}
    if tensors:
        with torch.no_grad():
            probs, indices = best_classes(model(torch.stack(tensors)), k)
        for path, p_row, i_row in zip(readable, probs, indices):
            rows[path] = [v for i, p in zip(i_row, p_row) for v in (names[i], f"{p:.6f}")]
    for path in chunk:  # in file order
        writer.writerow([str(path), *(rows.get(path) or [""] * (2 * k)), errors.get(path, "")])
    return len(errors)


def _print_summary(options: dict) -> None:
    count, failed = call(predict_folder, options)
    print(f"wrote {count} rows to {options['out']}"
          + (f"; {failed} image(s) could not be read (their rows hold the reason in the error column)" if failed else ""))


main = command("distill predict", predict_folder, run=_print_summary, description=__doc__.split("\n\n")[0],
               epilog="LightningCLI's predict (a checkpoint, on the validation split): distill predict --config FILE "
                      "--help lists its options.")
