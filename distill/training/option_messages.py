"""jsonargparse's refusal of a `distill fit` option, as one line naming the option and what it accepts.

LightningCLI's options are typed by the signatures of the classes a config names (the module, a student, a method
under `class_path`), so only jsonargparse knows an option's type while it parses, and jsonargparse 4 reports a
refused value as text alone: a `TypeError('Parser key "KEY": ...')`, nested once per `class_path`, whose cause is
lost at a union (`raise_union_unexpected_value` raises without `from`), and no exception at all for an unknown
option (`ex=None`). The commands outside LightningCLI check their options before jsonargparse does
(`distill.common.commandline.value_problem`) and read none of this text. This module is the one place that reads
jsonargparse's wording; `tests/test_private_library_members.py` (its plain types) and the one-line tests of the
method options in `tests/test_distillation_loss.py` (its unions and class paths) make each wording read here with
the installed jsonargparse, so a release that rewords one fails there, by name.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

__all__ = ["for_subcommand", "one_line", "out_of_range", "unknown_option"]


def unknown_option(text: str) -> str | None:
    """The option jsonargparse's one-line message calls unknown (`unrecognized arguments: --model.lrr=1`, `... does
    not accept option 'model.lrr'`, `Group 'model' does not accept option 'lrr'`), or None."""
    grouped = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", text)
    if grouped:
        return f"{grouped.group(1)}.{grouped.group(2)}"
    found = re.search(r"(?:[Oo]ption '|arguments: .*?--)([\w.]+)", text)
    return found.group(1) if found else None


def for_subcommand(text: str, subcommand: str, options: set[str]) -> str:
    """A message of the root parser about a subcommand's options in the subcommand's words: `fit.model.student` is
    `model.student` to a user of `distill fit` (only where what follows is one of its `options`, not in a value)."""
    def own(found: re.Match) -> str:
        return found.group(1) if found.group(1) in options else found.group(0)
    return re.sub(rf"(?<![\w.]){re.escape(subcommand)}\.([\w.]*\w)", own, text)


def one_line(message: str) -> str:
    """jsonargparse's (often several-line) message about one value, as one line: `key: what is wrong`."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    ranged = out_of_range(text)
    if ranged:
        return ranged
    named = re.search(r'Parser key "([\w.]+)":.*?Subtypes: \[typing\.Literal\[(.*?)\], <class \'([\w.]+)\'>\].*'
                      r'Given value: (.*)$', text)
    if named:  # a name of a table or a class_path (model.distillation): what was given, the names, the classes
        return _name_or_class(text, *named.groups())
    union = re.search(r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes.*?Errors: - (.*?)'
                      r'(?: - Expected a <class .NoneType.>.*)?$', text)
    if union:  # an optional number: the number's own complaint (a range, not an integer), and that null is accepted
        return one_line(f'Parser key "{union.group(1)}": {union.group(2)}') + " (or null)"
    choice = re.search(r'Parser key "([\w.]+)": Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$', text)
    if choice:
        return f"{choice.group(1)}: {choice.group(3)} is not one of {choice.group(2)}"
    text = re.sub(r"invalid literal for int\(\) with base 10: (.*)$", r"expected an integer, got \1", text)
    text = re.sub(r"could not convert string to float: (.*)$", r"expected a number, got \1", text)
    keyed = re.match(r'Parser key "([\w.]+)": (?:Not of type \w+: )?(.*)$', text)
    return f"{keyed.group(1)}: {keyed.group(2)}" if keyed else text


def _name_or_class(text: str, key: str, names: str, base: str, given: str) -> str:
    """An option that takes a name of a table or a class_path (model.distillation: `dkd` or `DKD` with options)."""
    base_name = base.rpartition(".")[2]
    classes = ", ".join(c.__name__ for c in _subclasses(base))
    problem = re.search(r"Problem with given class_path '([\w.]+)': (.*?)(?: Given value type|$)", text)
    if problem and _import(problem.group(1)) is None:  # a dotted path that names no class: shown whole
        return (f"{key}: '{problem.group(1)}' names no class ({problem.group(2)}); give one of {names} or a "
                f"{base_name} class: {classes}")
    unnamed = re.search(r"Option '(\w+)' is not accepted", problem.group(2)) if problem else None
    if unnamed and problem.group(1).rpartition(".")[2] == base_name:  # options and no class: jsonargparse tried the base
        option = unnamed.group(1)
        taking = ", ".join(_taking(base, option)) or "none"
        return (f"{key}: an option ('{option}') without a method to take it (a dotted key `{key.rpartition('.')[2]}."
                f"{option}` in a file replaces the name beside it); give the class with its options: `"
                f"{key.rpartition('.')[2]}: {{class_path: CLASS, init_args: {{{option}: VALUE}}}}` (classes that take "
                f"{option}: {taking})")
    if problem:  # the class was found: its own complaint, and the options it takes
        found = _import(problem.group(1))
        accepted = ", ".join(inspect.signature(found).parameters) if found else ""
        return f"{key}: {problem.group(1).rpartition('.')[2]}: {problem.group(2)}" + (f" (its options: {accepted})"
                                                                                    if accepted else "")
    nested = re.match(r"NestedArg\(key='([\w.]+)'", given)
    if nested:  # `--key name --key.option v`: a name takes no options of its own, its class does
        option = nested.group(1)
        taking = _taking(base, option)
        if not taking:
            return f"{key}: no method takes an option '{option}' (classes: {classes})"
        return (f"{key}: a method given by name takes no options of its own ('{option}'); give a class that "
                f"takes it, with them: --{key} CLASS --{key}.{option} VALUE (classes that take {option}: "
                f"{', '.join(taking)})")
    return f"{key}: {given} is not one of {names} (or a {base_name} class with its options: {classes})"


def _taking(base: str, option: str) -> list[str]:
    """The names of the classes under `base` that take `option`."""
    return [c.__name__ for c in _subclasses(base) if option in inspect.signature(c).parameters]


def _import(path: str) -> Any:
    """The object a dotted path names, or None."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _subclasses(path: str) -> list[type]:
    """The subclasses a class registers (those a `class_path` may name), in their table's order if it has one."""
    base = _import(path)
    if base is None:
        return []
    found = getattr(base, "registry", None)
    found = list(found.values()) if isinstance(found, dict) else base.__subclasses__()
    return sorted(found, key=lambda c: getattr(c, "order", 0))


def out_of_range(text: str) -> str | None:
    """jsonargparse's message for a value outside its range type, as `option: value is out of range (accepted: ...)`."""
    found = re.search(r"(?:Not of type \w+: )?(\S+)? ?does not conform to restriction (.+?)(?:\. Got value| - | Given value|$)",
                      text)
    keys = re.findall(r'Parser key "([\w.]+)"', text)
    if not found or not keys:
        return None
    key = keys[0] if len(keys) == 1 else f"{keys[0]}.init_args.{keys[-1]}"  # a class's own option: model.student...
    value, rule = found.groups()
    rule = rule.strip().replace("v>=", ">= ").replace("v<=", "<= ").replace("v>", "> ").replace("v<", "< ")
    if not value:
        given = re.search(r"Given value: (\S+)", text)
        value = given.group(1) if given else None
    nullable = " or null" if "NoneType" in text else ""
    return f"{key}: {value} is out of range (accepted: {rule}{nullable})" if value else f"{key}: out of range (accepted: {rule}{nullable})"
