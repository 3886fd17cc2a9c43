"""`distill compare --test DIR`: each finished run's final checkpoint, and its teacher(s), measured on a held-out
folder: images that no run trained on nor chose its best epoch on. A best epoch picked on the split it is scored on
flatters the model it picks, a teacher's most, and it is the bar a student is held to; the held-out figures do not.

DIR holds `val/<class>/` with the runs' class folders (a `train/` beside it must hold the same ones; it is not read).
Each measurement is `distill validate` of the run's own options on DIR, a child process on one device over every
image of DIR, kept in the run's folder (`held_out.json`) with what it was made from: the checkpoint's bytes and DIR's
images. Either changed, it is measured again; nothing else is rewritten."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from distill.common.digests import folder_digest
from distill.common.errors import UserError
from distill.common.files import write_atomically
from distill.common.identity import file_digest, read_record
from distill.common.processes import Children
from distill.data.sources import FolderSource, open_source
from distill.training.cli import fit_options

__all__ = ["RECORD", "check_held_out", "measure_held_out"]

RECORD = "held_out.json"
# what a measurement sets over the run's options: the held-out images, all of them, on one device, nothing logged
MEASURE = ("--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--trainer.limit_val_batches=1.0", "--trainer.fast_dev_run=false", "--trainer.devices=1",
           "--trainer.num_nodes=1", "--trainer.strategy=auto")


def check_held_out(folder: str, run: dict[str, Any]) -> Path:
    """The held-out folder, refused in one line before any run starts: not a folder of val/<class>/ images, other
    classes than the data of `run` (one of compare's planned runs), in order, or that data itself."""
    data = fit_options(run["fit_args"], "compare", as_given=True)["data"]
    classes = open_source(data["dataset"], data["img_size"], data["image_column"], data["label_column"]).classes
    root = Path(folder)
    if not folder or not root.is_dir():
        state = "is empty" if not folder else "does not exist" if not root.exists() else "is a file, not a folder"
        raise UserError(f"compare --test: '{folder}' {state}; give a folder of held-out images as val/<class>/* "
                        "(e.g. python benchmarks/make_letters.py --out DIR --train 0 --val 100 --seed 1)")
    try:
        source = FolderSource(root, bad_images="error")
        source.split("val", None)  # every class folder holds an image
    except UserError as err:
        raise UserError(f"compare --test: {str(err).removeprefix('data.dataset: ')}") from None
    if source.classes != classes:
        other = sorted(set(source.classes) ^ set(classes))[:3] or source.classes[:3]
        raise UserError(f"compare --test: '{folder}' holds other class folders than the runs' data ({len(source.classes)}"
                        f" against {len(classes)}; e.g. {other}); give held-out images of the same classes")
    if run["options"].get("data.dataset") == folder_digest(root):  # the runs record their data by content
        raise UserError(f"compare --test: '{folder}' is the runs' own data.dataset; give images they were not trained "
                        "or validated on")
    return root


def measure_held_out(runs: list[dict[str, Any]], folder: Path, children: Children, threads: int) -> dict[str, str]:
    """Add each finished run's validation metrics on `folder` as run["held_out"], measuring only what its
    held_out.json does not hold for the same checkpoint and images; returns the folder and its digest."""
    data = folder_digest(folder / "val")
    for run in runs:
        if not run.get("result"):
            continue
        checkpoint = run["folder"] / "checkpoints" / "last.ckpt"  # the final epoch's weights
        if not checkpoint.is_file():
            raise UserError(f"compare --test: {run['type']} seed {run['seed']} has no {checkpoint}, its final "
                            "epoch's weights, which --test measures: leave checkpoint.save_last on")
        made_from = {"checkpoint": file_digest(checkpoint), "data": data}
        record = read_record(run["folder"] / RECORD)
        if not (record and record.get("made_from") == made_from and isinstance(record.get("metrics"), dict)):
            record = {"made_from": made_from, "metrics": _validate(run, checkpoint, folder, children, threads)}
            with write_atomically(run["folder"] / RECORD) as partial:
                partial.write_text(json.dumps(record, indent=2))
            print(f"[compare] {run['type']} seed {run['seed']}: held-out top-1 "
                  f"{100 * record['metrics'].get('val/acc', float('nan')):.2f}%", flush=True)
        run["held_out"] = record["metrics"]
    return {"folder": str(folder), "data": data}


def _validate(run: dict[str, Any], checkpoint: Path, folder: Path, children: Children,
              threads: int) -> dict[str, float]:
    """`distill validate` with the run's own fit options (its configs, data options, method, teacher) on `folder`,
    as a child process (Ctrl+C and SIGTERM stop it as they stop the runs); its output goes to held_out.log."""
    measured, log = run["folder"] / "held_out.measured.json", run["folder"] / "held_out.log"
    measured.unlink(missing_ok=True)
    command = [sys.executable, "-m", "distill", "validate", *run["fit_args"], f"--data.dataset={folder}",
               f"--ckpt_path={checkpoint}", *MEASURE, f"--metrics_json={measured}"]
    with open(log, "w") as handle:
        code = children.start(command, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}).wait()
    metrics = read_record(measured)
    measured.unlink(missing_ok=True)
    if code != 0 or not metrics:
        said = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
        raise UserError(f"compare --test: measuring {run['type']} seed {run['seed']} on '{folder}' failed (exit "
                        f"{code}){': ' + said[-1][len('error: '):] if said else ''}; its output: {log}")
    return metrics
