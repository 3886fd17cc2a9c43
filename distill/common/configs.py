"""The --config files of a LightningCLI command line, checked before torch, Lightning and timm load.

    distill fit --config configs/distill.yaml --config configs/students/deit.yaml

`distill.cli` runs `check_config_files` before it imports the training command (seconds of imports), so a
config file that is missing or is not a YAML mapping is one line at once; LightningCLI (jsonargparse) then reads
the files themselves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from distill.common.argv import values
from distill.common.errors import UserError
from distill.common.files import load_yaml

__all__ = ["check_config_files", "config_files", "config_with_key"]


def config_files(argv: list[str]) -> list[str]:
    """The --config (-c) values of `argv`, in the order they apply (`--config X` and `--config=X` alike)."""
    return values(argv, "--config", "-c")


def check_config_files(argv: list[str]) -> None:
    """Each --config file must exist and be readable YAML holding a mapping; errors name the file (line and column
    for bad YAML). A value that is no file but YAML of a mapping is an inline config, as jsonargparse takes it."""
    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            if not _inline_mapping(name):
                what = "is a folder" if path.is_dir() else "does not exist"
                raise UserError(f"config: '{name}' {what}; give a YAML file of options (e.g. configs/distill.yaml)")
            continue
        content = load_yaml(path)
        if not isinstance(content, dict):
            got = "is empty" if content is None else f"holds a {type(content).__name__}"
            raise UserError(f"{name}: a config must be a mapping of options (model:, data:, trainer:, ...) but the "
                            f"file {got}")


def _inline_mapping(value: str) -> bool:
    """Whether `value` is YAML of a mapping (`--config '{trainer: {max_epochs: 1}}'`), which jsonargparse parses as a
    config itself when it names no file."""
    try:
        return isinstance(yaml.safe_load(value), dict)
    except yaml.YAMLError:
        return False


def config_with_key(argv: list[str], dotted: str, last: bool = False) -> str | None:
    """The (first, or `last`) --config file of `argv` that sets the dotted key, if any."""
    files = config_files(argv)
    for name in reversed(files) if last else files:
        try:
            node = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _sets(node, dotted.split(".")):
            return name
    return None


def _sets(node: Any, parts: list[str]) -> bool:
    """Whether a config's mapping sets the key of `parts`, nested (`model: {lr: ...}`) or dotted (`model.lr: ...`)."""
    if not parts:
        return node is not None
    return isinstance(node, dict) and any(".".join(parts[:end]) in node and _sets(node[".".join(parts[:end])],
                                                                                  parts[end:])
                                          for end in range(1, len(parts) + 1))
