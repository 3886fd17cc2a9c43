"""`distill compare --test DIR`: each finished run's final checkpoint, and its teacher(s), measured on a held-out
folder: images that no run trained on nor chose its best epoch on. A best epoch picked on the split it is scored on
flatters the model it picks, a teacher's most, and it is the bar a student is held to; the held-out figures do not.

DIR holds `val/<class>/` (alone, or beside a `train/` that is not read), the runs' class folders. Each measurement is
`distill validate` of the run's own options on DIR, kept in the run's folder (`held_out.json`) with what it was made
from: the checkpoint's bytes and DIR's images. Either changed, it is measured again; nothing else is rewritten."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from distill.common.digests import folder_digest
from distill.common.errors import UserError
from distill.common.files import write_atomically
from distill.common.identity import file_digest, read_record
from distill.training.cli import make_cli

__all__ = ["RECORD", "check_held_out", "measure_held_out"]

RECORD = "held_out.json"


def check_held_out(folder: str) -> Path:
    """The held-out folder, refused in one line before any run starts when it has no val/ class folders."""
    root = Path(folder)
    if not (root / "val").is_dir() or not any(path.is_dir() for path in (root / "val").iterdir()):
        raise UserError(f"compare --test: '{folder}' has no val/<class>/ folders; give a folder of held-out images "
                        "as val/<class>/*, the runs' class folders (e.g. python benchmarks/make_letters.py --out DIR "
                        "--train 0 --val 100 --seed 1)")
    return root


def measure_held_out(runs: list[dict[str, Any]], folder: Path, threads: int) -> None:
    """Add each finished run's validation metrics on `folder` as run["held_out"], measuring only what its
    held_out.json does not hold for the same checkpoint and images."""
    data = folder_digest(folder / "val")
    for run in runs:
        checkpoint = run["folder"] / "checkpoints" / "last.ckpt"  # the final epoch's weights
        if not run.get("result") or not checkpoint.is_file():
            continue
        made_from = {"checkpoint": file_digest(checkpoint), "data": data}
        record = read_record(run["folder"] / RECORD)
        if record is None or record.get("made_from") != made_from:
            record = {"made_from": made_from, "metrics": _validate(run, checkpoint, folder, threads)}
            with write_atomically(run["folder"] / RECORD) as partial:
                partial.write_text(json.dumps(record, indent=2))
            print(f"[compare] {run['type']} seed {run['seed']}: held-out top-1 "
                  f"{100 * record['metrics'].get('val/acc', float('nan')):.2f}%", flush=True)
        run["held_out"] = record["metrics"]


def _validate(run: dict[str, Any], checkpoint: Path, folder: Path, threads: int) -> dict[str, float]:
    """`distill validate` with the run's own fit options (its configs, data options, method, teacher), in this
    process, on `folder`; its output goes to the run's held_out.log. Later options override earlier ones."""
    args = ["validate", *run["fit_args"], f"--data.dataset={folder}", f"--ckpt_path={checkpoint}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    log = run["folder"] / "held_out.log"
    torch.set_num_threads(threads)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            cli = make_cli(args)
        except (SystemExit, UserError) as err:
            handle.write(f"\n{err}\n")
            failed = err
        else:
            failed = None
    if failed is not None:  # a UserError says what is wrong in a line; a parser's SystemExit wrote it to the log
        said = str(failed) if isinstance(failed, UserError) else f"its error is at the end of {log}"
        raise UserError(f"compare --test: measuring {run['type']} seed {run['seed']} on '{folder}' failed: {said}")
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items() if name.startswith("val/")}
