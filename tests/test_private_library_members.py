"""The private library members the project relies on (distill/adapters.py) exist in the installed versions.

An upgrade that renames or removes one fails here, naming it, instead of deep inside a training run.
"""
import numpy as np
import pytest
import pytorch_lightning as pl
from jsonargparse import ArgumentParser
from pytorch_lightning.callbacks import ModelCheckpoint
from timm.data import Mixup

from distill import adapters


@pytest.mark.parametrize("owner, name", adapters.OVERRIDDEN, ids=lambda x: getattr(x, "__name__", x))
def test_every_overridden_library_hook_still_exists(owner, name):
    assert callable(getattr(owner, name, None)), f"{owner.__module__}.{owner.__name__}.{name} is gone: see adapters.py"


def test_the_checkpoint_callback_still_keeps_the_attributes_the_project_reads():
    callback = ModelCheckpoint()
    for name in adapters.CHECKPOINT_ATTRIBUTES:
        assert hasattr(callback, name), f"ModelCheckpoint.{name} is gone: see adapters.py"


def test_mixup_draw_is_timms_batch_draw_under_numpys_global_seed():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    draws = []
    for _ in range(2):
        np.random.seed(3)
        draws.append([adapters.mixup_draw(mixup) for _ in range(20)])
    assert draws[0] == draws[1]  # seeded: the replay of a pair depends on it
    assert all(0.0 <= lam <= 1.0 and isinstance(cut, (bool, np.bool_)) for lam, cut in draws[0])
    assert {bool(cut) for _, cut in draws[0]} == {True, False}  # both modes drawn at switch_prob 0.5


def test_trainer_internals_the_callbacks_read_are_there(tmp_path):
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    assert adapters.batches_done_this_epoch(trainer) == 0
    assert callable(trainer._checkpoint_connector.dump_checkpoint)  # what adapters.dump_checkpoint calls
    assert adapters.is_local_path(str(tmp_path / "last.ckpt")) and not adapters.is_local_path("s3://bucket/last.ckpt")


def test_option_names_lists_options_of_a_parser_and_its_subcommands():
    parser, fit = ArgumentParser(), ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    fit.add_argument("--model.lr", type=float, default=1e-3)
    parser.add_subcommands().add_subcommand("fit", fit)
    names = adapters.option_names(parser)
    assert {"seed", "model.lr"} <= names and "help" not in names
