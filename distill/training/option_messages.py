"""A refused `distill fit` option as one line naming the option and what it accepts.

LightningCLI's options are typed by the signatures of the classes a config names (the module, a student, a method
under `class_path`), so jsonargparse checks them while it parses. It says which option it refused, and why, in its
message text alone; `distill.common.adapters.record_refusals` makes its exception carry the option, its type and the
value (a `Refusal`), and this module words them from those objects and from the classes they name, with the checks
the other commands' options go through (`distill.common.commandline.value_problem`). An unknown option is found by
comparing what was given (the command line's tokens, the parsed config's keys) with the parser's options. Nothing
here reads jsonargparse's text; an error that carries neither (a config file that does not load) is shown as
jsonargparse says it, on one line.
"""
from __future__ import annotations

import argparse
import collections.abc
import importlib
import inspect
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from distill.common.adapters import Refusal, nested_option, option_names, subcommand_parsers
from distill.common.argv import as_typed
from distill.common.commandline import value_problem
from distill.common.ranges import accepted

__all__ = ["describe", "one_line", "unknown_key", "unknown_token"]


def one_line(message: str) -> str:
    """A (often several-line) message as one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def describe(chain: list[Refusal]) -> str | None:
    """`option: what is wrong` for the refusals of one value (outermost first: a class option, then the option of
    that class that was refused), or None without a refusal."""
    if not chain:
        return None
    outer, inner = chain[0], chain[-1]
    if len(chain) > 1:  # a class's own option, refused by the class's parser: model.student.init_args.depth
        problem = _value_problem(inner.hint, inner.value)
        if problem:
            return f"{'.init_args.'.join(refusal.key for refusal in chain)}: {problem}"
    problem = _value_problem(outer.hint, outer.value)
    problem = f"{outer.key}: {problem}" if problem else _class_option(outer)
    return problem or f"{outer.key}: expected {_expected(outer.hint)}, got {_shown(outer.value)}"


def _value_problem(hint: Any, value: Any) -> str | None:
    """value_problem for a value as jsonargparse hands it over (a command line's text or a config's number), and a
    value none of a union of choices and plain types takes (`trainer.precision`, `seed_everything`)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    members = [m for m in typing.get_args(hint) if m is not type(None)] if _is_union(hint) else []
    if len(members) > 1 and all(typing.get_origin(m) is Literal or m in (bool, int, float) for m in members):
        return f"expected {_expected(hint)}, got {_shown(value)}"  # jsonargparse refused it: no member takes it
    return value_problem(hint, str(value))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _expected(hint: Any) -> str:
    """What a type accepts, in words: `an integer`, `one of 'fast', 'slow'`, `a list of 2 numbers or null`."""
    if _is_union(hint):
        members = typing.get_args(hint)
        choices = [c for m in members if typing.get_origin(m) is Literal for c in typing.get_args(m)]
        said = [f"one of {', '.join(dict.fromkeys(map(repr, choices)))}"] if choices else []
        said += [_expected(m) for m in members if typing.get_origin(m) is not Literal and m is not type(None)]
        return " or ".join([*said, *(["null"] if type(None) in members else [])])
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {', '.join(map(repr, arguments))}"
    if origin is tuple and arguments and arguments[-1] is not Ellipsis:
        numbers = all(a in (int, float) or accepted(a) for a in arguments)
        return f"a list of {len(arguments)} {'numbers' if numbers else 'values'}"
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return "a list"
    if origin is collections.abc.Callable:
        return "a class path (with its init_args)"
    rules = accepted(hint)
    if rules:
        return f"a number {' and '.join(f'{comparison} {bound}' for comparison, bound in rules[1])}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    if hint in words:
        return words[hint]
    return f"a {hint.__name__} class path (with its init_args)" if inspect.isclass(hint) else str(hint)


def _shown(value: Any) -> str:
    """A given value as the user wrote it: the text of a command line, a config's value as YAML would say it."""
    nested = nested_option(value)
    if nested:
        return f"{nested[0]}={nested[1]}"
    return repr(value) if isinstance(value, str) else str(_mapping(value) if _mapping(value) is not None else value)


def _class_option(refusal: Refusal) -> str | None:
    """An option that takes a class with its options (`model.distillation`: a method's name or `class_path`;
    `trainer.logger`, `model.student`: a class path), else None."""
    key = refusal.key
    members = typing.get_args(refusal.hint) if _is_union(refusal.hint) else (refusal.hint,)
    names = [name for member in members if typing.get_origin(member) is Literal for name in typing.get_args(member)]
    bases = [m for m in members if inspect.isclass(m) and m not in (bool, int, float, str, type(None))]
    bases += [typing.get_args(m)[-1] for m in members if typing.get_origin(m) is collections.abc.Callable]
    if not bases or not inspect.isclass(bases[0]):
        return None
    base = bases[0]
    listed = ", ".join(c.__name__ for c in _subclasses(base))
    classes = f": {listed}" if listed else ""
    named = f"one of {', '.join(map(repr, names))} or a {base.__name__} class" if names else f"a {base.__name__} class"
    nested = nested_option(refusal.value)
    if nested:  # `--key CLASS --key.option value`, or `--key name --key.option value`
        option, value = nested
        found = _class(base, refusal.previous)
        if found:
            return _init_arg_problem(key, found, option, value)
        taking = _taking(base, option)
        if not names:
            return None
        if not taking:
            return f"{key}: no method takes an option '{option}' (classes{classes or ': none'})"
        return (f"{key}: a method given by name takes no options of its own ('{option}'); give a class that "
                f"takes it, with them: --{key} CLASS --{key}.{option} VALUE (classes that take {option}: "
                f"{', '.join(taking)})")
    if isinstance(refusal.value, str):
        if refusal.value in names or _class(base, refusal.value):
            return None
        if "." in refusal.value:  # a dotted path that names no class: shown whole, with why
            return (f"{key}: '{refusal.value}' names no class ({_import_problem(refusal.value)}); give "
                    f"{named}{classes}")
        if not names:
            return None
        return (f"{key}: {refusal.value} is not one of {', '.join(map(repr, names))} (or a {base.__name__} class "
                f"with its options{classes})")
    given = _mapping(refusal.value)
    if given is None:
        return None
    path = given.get("class_path")
    options = {**(_mapping(given.get("init_args")) or {}),
               **{k: v for k, v in given.items() if k not in ("class_path", "init_args", "dict_kwargs", "__path__")}}
    if path is None and options:  # options and no class: `distillation.beta: 3` beside `distillation: DKD` in a file
        option = next(iter(options))
        field = key.rpartition(".")[2]
        return (f"{key}: an option ('{option}') without a class to take it (a dotted key `{field}.{option}` in a "
                f"file replaces the name beside it); give the class with its options: `{field}: {{class_path: CLASS, "
                f"init_args: {{{option}: VALUE}}}}` (classes that take {option}: {', '.join(_taking(base, option)) or 'none'})")
    found = _class(base, path)
    if found is None:
        return f"{key}: '{path}' names no class ({_import_problem(str(path))}); give {named}{classes}"
    for option, value in options.items():
        problem = _init_arg_problem(key, found, option, value)
        if problem:
            return problem
    return None


def _init_arg_problem(key: str, found: type, option: str, value: Any) -> str | None:
    """What is wrong with `option` of the class `found` given `value`: not one of its options, or out of its type."""
    parameters = inspect.signature(found).parameters
    if option not in parameters:
        return f"{key}: {found.__name__}: Option '{option}' is not accepted (its options: {', '.join(parameters)})"
    try:
        hint = typing.get_type_hints(found.__init__).get(option)
    except (NameError, TypeError):  # an annotation that does not resolve here: the option's type is said instead
        return None
    problem = _value_problem(hint, value)
    return f"{key}.init_args.{option}: {problem}" if problem else None


def _mapping(value: Any) -> dict[str, Any] | None:
    """A config's mapping (jsonargparse's Namespace or a dict) as a dict of its top-level keys, else None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    return None


def _class(base: type, given: Any) -> type | None:
    """The class under `base` that a name (`DKD`), a dotted path or a `class_path` mapping names, else None."""
    mapping = _mapping(given)
    path = mapping.get("class_path") if mapping is not None else given
    if not isinstance(path, str):
        return None
    found = next((c for c in _subclasses(base) if path in (c.__name__, f"{c.__module__}.{c.__qualname__}")), None)
    if found is None and "." in path:
        module, _, name = path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return None
    return found if inspect.isclass(found) and issubclass(found, base) else None


def _import_problem(path: str) -> str:
    """Why a dotted path names no class: the import's own complaint."""
    module, _, name = path.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        return str(error)
    return "not a class of this option"


def _subclasses(base: type) -> list[type]:
    """The classes a `class_path` of `base` may name where it keeps a table of them (the methods), in its order."""
    table = getattr(base, "registry", None)
    return sorted(table.values(), key=lambda c: getattr(c, "order", 0)) if isinstance(table, dict) else []


def _taking(base: type, option: str) -> list[str]:
    """The names of the classes under `base` that take `option`."""
    return [c.__name__ for c in _subclasses(base) if option in inspect.signature(c).parameters]


def _known(key: str, names: set[str]) -> bool:
    """Whether a dotted key is an option, or below an option that is no group of others (the options of a class:
    `model.distillation.init_args.beta`; not `model.lrr` below `model`, which loads the model's options from a file)."""
    if key in names or "__" in key:
        return True
    parts = key.split(".")
    prefixes = (".".join(parts[:end]) for end in range(1, len(parts)))
    return any(p in names and not any(n.startswith(f"{p}.") and n != f"{p}.help" for n in names) for p in prefixes)


def unknown_key(keys: Iterable[str], parser: argparse.ArgumentParser) -> str | None:
    """The first key of a parsed config that is no option of `parser` (its subcommand's, below `fit.`), else None."""
    subcommands = subcommand_parsers(parser)
    own = option_names(parser) | {"config", "help"}
    for key in keys:
        head, _, rest = key.partition(".")
        if head in subcommands and rest:
            if not _known(rest, option_names(subcommands[head]) | {"config", "help"}):
                return rest
        elif not _known(key, own):
            return key
    return None


def unknown_token(argv: list[str], parser: argparse.ArgumentParser) -> tuple[str, str] | None:
    """The first option of a command line that is no option of `parser` or its subcommands: its name and the option
    as typed, with its value (`model.lrr`, `--model.lrr=1` or `--model.lrr 1`), else None."""
    names = option_names(parser) | {"config", "help"}
    return next(((key, typed) for key, typed in as_typed(argv) if not _known(key, names)), None)
