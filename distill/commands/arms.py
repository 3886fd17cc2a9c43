"""The arms of `distill compare --types`: a method by name, or a YAML file that sets `model.distillation` to a
method's class with its options (the arm is named by the file's stem). An arm differs from the others in its method
alone; an arm that runs no teacher (`none`) may also set the training views' options (`TRAINING_VIEWS`), so that the
student alone trains at the augmentation it learns best from (configs/baselines/no_teacher.yaml), and the gains are
measured from it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from distill.common.errors import UserError
from distill.common.names import check_name
from distill.training.cli import fit_options
from distill.training.datamodule import TRAINING_VIEWS
from distill.training.methods import method_names, needs_teacher

__all__ = ["arm_of", "is_method_option", "method_of"]

BASELINE_OPTIONS = tuple(f"data.{name}" for name in TRAINING_VIEWS)  # what an arm without a teacher may set too


def is_method_option(key: str) -> bool:
    return key == "model.distillation" or key.startswith("model.distillation.")


def arm_of(kind: str, configs: list[str], extra: list[str], options: dict[str, Any]) -> tuple[str, list[str], Any]:
    """(its name, the fit options that choose it, what it sets: None for a method by name, else its method's resolved
    options and, for an arm without a teacher, the training views' options it changes) of one of compare's --types."""
    if kind in method_names():
        return kind, [f"--model.distillation={kind}"], None
    if kind.endswith((".yaml", ".yml")) and not Path(kind).is_file():
        raise UserError(f"compare --types: '{kind}' does not exist (an arm's file: it sets model.distillation)")
    if not kind.endswith((".yaml", ".yml")):
        raise UserError(f"compare --types: '{kind}' is neither a method ({', '.join(method_names())}) nor a YAML file "
                        "that sets model.distillation (a method's class with its options)")
    name = check_name(Path(kind).stem, f"compare --types '{kind}' (its file name names the arm)",
                      {method: f"the method {method}" for method in method_names()})  # `none` is the baseline
    resolved = fit_options([*configs, *extra, "--config", kind], "compare")
    own = is_method_option if needs_teacher(method_of(kind, _method_options(resolved))) else _is_baseline_option
    besides = sorted(key for key in set(resolved) | set(options)
                     if not own(key) and resolved.get(key) != options.get(key))
    if besides:
        alone = own is _is_baseline_option
        raise UserError(f"compare --types: '{kind}' sets {besides[0]} besides model.distillation" +
                        (" and the training views' options" if alone else "") + "; an arm differs from the others in "
                        "its method alone" + ("" if alone else " (one without a teacher also in its augmentation)") +
                        "; give shared options to every run with --config or --KEY")
    return name, ["--config", kind], {k: v for k, v in resolved.items()
                                      if own(k) and (is_method_option(k) or resolved.get(k) != options.get(k))}


def _method_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if is_method_option(k)}


def _is_baseline_option(key: str) -> bool:
    """What an arm without a teacher may set besides its method: the training views' options (the augmentation the
    student learns best from alone: configs/baselines/no_teacher.yaml), not the data nor the validation views."""
    return is_method_option(key) or key in BASELINE_OPTIONS


def method_of(kind: str, arm: Optional[dict[str, Any]]) -> Any:
    """The method an arm runs, as `needs_teacher` reads it: its name, or the class path (or name) its file sets."""
    if arm is None:
        return kind
    if "model.distillation.class_path" in arm:
        return {"class_path": arm["model.distillation.class_path"]}
    return arm.get("model.distillation", kind)
