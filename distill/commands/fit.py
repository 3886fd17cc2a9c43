"""`distill fit / validate / test / predict`: LightningCLI with this project's defaults and checks
(distill/training/cli.py builds it).

    distill fit --config configs/distill.yaml
    distill fit --config configs/distill.yaml --print_config
    distill validate --config configs/distill.yaml --ckpt_path runs/distill/checkpoints/best.ckpt
"""
from __future__ import annotations

import warnings

from distill.training.cli import make_cli

__all__ = ["main"]


def main(argv: list[str] | None) -> None:
    """`distill fit|validate|test|predict ...` (None: the process's command line), LightningCLI with this project's
    defaults and checks."""
    with warnings.catch_warnings():
        # our data module restores mid-epoch positions itself (see ImageDataModule.state_dict)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        # fit refuses a folder of an earlier run itself (before_fit); resuming into it is what was asked
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        # Lightning's own use of a torch API that torch deprecated: between the two libraries, nothing to act on
        warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)` is deprecated",
                                category=FutureWarning)
        make_cli(argv)
