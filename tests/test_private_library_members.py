"""The private library members the project relies on (distill/common/adapters.py) exist in the installed versions.

An upgrade that renames or removes one fails here, naming it, instead of deep inside a training run.
"""
import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from jsonargparse import ArgumentParser
from timm.data import Mixup

from distill.common import adapters

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "timm", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "jsonargparse",
             "torchmetrics", "litserve")


def resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("owner, name", adapters.OVERRIDDEN, ids=lambda x: str(x).rsplit(".", 1)[-1])
def test_every_overridden_library_hook_still_exists(owner, name):
    assert callable(getattr(resolve(owner), name, None)), f"{owner}.{name} is gone: see adapters.py"


@pytest.mark.parametrize("owner, name", adapters.SUBCLASS_ATTRIBUTES, ids=lambda x: str(x).rsplit(".", 1)[-1])
def test_the_library_attributes_the_subclasses_read_are_still_kept(owner, name):
    assert hasattr(resolve(owner)(), name), f"{owner}.{name} is gone: see adapters.py"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_library_member_is_used_outside_adapters():
    """An ast walk of the project: a private name (`_x`) read as an attribute, imported from a library or named to
    getattr, that the project does not define itself (a function, class or assigned name of its own), is a private
    library member; only adapters.py may use one, and the hooks its lists name."""
    files = [p for folder in ("distill", "students", "teachers", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    trees = {path: ast.parse(path.read_text()) for path in files}
    registered = {name for _, name in adapters.OVERRIDDEN + adapters.SUBCLASS_ATTRIBUTES}
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name):
                own.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "__setattr__" and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant):
                own.add(node.args[1].value)
    own -= registered  # a library's attribute the project also sets is still the library's
    allowed = registered | {"_exit"}  # os._exit: documented, not private
    found = []
    for path, tree in trees.items():
        if path.name == "adapters.py":
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                names = [part for part in (node.module or "").split(".")] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr", "setattr") \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                names = [node.args[1].value]
            for name in names:
                if _private(name) and name not in own and name not in allowed:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not found, "private library members outside distill/common/adapters.py (move them there): " + "; ".join(found)


def test_attention_weights_are_the_softmax_rows_of_a_timm_vit_block():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    attention = model.blocks[-1].attn
    with torch.no_grad(), adapters.attention_weights(attention) as captured:
        model.forward_features(torch.randn(2, 3, 32, 32))
    assert captured[0].shape == (2, 2, 17, 17) and torch.allclose(captured[0].sum(-1), torch.ones(2, 2, 17))
    assert attention.fused_attn == timm.layers.use_fused_attn() and not attention.attn_drop._forward_hooks


def test_torch_still_says_whether_the_cpu_computes_bf16():
    # cpu_computes_bf16 falls back to False without them: the teacher would silently stay in fp32 on a bf16 CPU
    assert callable(torch.cpu._is_avx512_bf16_supported) and callable(torch.cpu._is_amx_tile_supported)
    assert adapters.cpu_computes_bf16() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


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
    assert adapters.subcommand_parsers(parser) == {"fit": fit} and adapters.subcommand_parsers(fit) == {}


def _refused(argv: list[str]) -> list[adapters.Refusal]:
    import calendar
    from typing import Literal, Optional

    from jsonargparse import ArgumentError

    from distill.common.ranges import PositiveFloat, PositiveInt

    adapters.record_refusals()
    parser = ArgumentParser(prog="check", exit_on_error=False)
    parser.add_argument("--count", type=PositiveInt, default=1)
    parser.add_argument("--rate", type=Optional[PositiveFloat], default=None)
    parser.add_argument("--mode", type=Literal["fast", "slow"], default="fast")
    parser.add_argument("--calendar", type=Optional[calendar.Calendar], default=None)
    with pytest.raises(ArgumentError) as said:
        parser.parse_args(argv)
    return adapters.refusals(said.value)


def test_a_refused_value_carries_its_option_type_and_value_through_the_adapter():
    # jsonargparse names a refused option in its message text alone: adapters.record_refusals wraps its check of a
    # typed option (a private method) so that the exception carries them; distill fit's one-line errors read these
    import calendar
    from typing import Literal, Optional

    from distill.common.ranges import PositiveFloat, PositiveInt

    assert [(r.key, r.hint, r.value) for r in _refused(["--count=0"])] == [("count", PositiveInt, "0")]
    assert [(r.key, r.hint, r.value) for r in _refused(["--rate=-1"])] == [("rate", Optional[PositiveFloat], "-1")]
    assert [(r.key, r.value) for r in _refused(["--mode=medium"])] == [("mode", "medium")]
    assert _refused(["--mode=medium"])[0].hint == Literal["fast", "slow"]
    # a class's option: the option naming the class (with the class given before) then the class's own option
    outer, inner = _refused(["--calendar=calendar.Calendar", "--calendar.firstweekday=x"])
    assert outer.key == "calendar" and outer.hint == Optional[calendar.Calendar]
    assert adapters.nested_option(outer.value) == ("firstweekday", "x")
    assert outer.previous.class_path == "calendar.Calendar"
    assert (inner.key, inner.hint, inner.value) == ("firstweekday", int, "x")
    assert adapters.nested_option("x") is None and adapters.nested_option(("a", "b")) is None


def test_an_unknown_key_of_a_parsed_config_is_a_key_error_of_validate():
    # OneLineErrorParser.validate names the key itself (distill/training/option_messages.py: unknown_key)
    from jsonargparse import Namespace

    root, fit = ArgumentParser(prog="check"), ArgumentParser()
    fit.add_argument("--model.lr", type=float, default=1e-3)
    root.add_subcommands().add_subcommand("fit", fit)
    with pytest.raises(KeyError):
        root.validate(Namespace(subcommand="fit", fit=Namespace(model=Namespace(lr=0.1, lrr=1))))
