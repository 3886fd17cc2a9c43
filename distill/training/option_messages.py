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
import json
import os
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from jsonargparse import get_loader

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
        problem = problem or f"expected {_expected(inner.hint)}, got {_shown(inner.value)}"
        return f"{'.init_args.'.join(refusal.key for refusal in chain)}: {problem}"
    nested = nested_option(outer.value)
    if nested and not _class_bases(outer.hint):  # `--model.tau.x 3`: no class, no options
        return f"unknown option '{outer.key}.{nested[0]}' ({outer.key} takes a value, not options of its own)"
    problem = _value_problem(outer.hint, outer.value)
    problem = f"{outer.key}: {problem}" if problem else _class_option(outer)
    return problem or f"{outer.key}: expected {_expected(outer.hint)}, got {_shown(outer.value)}"


def _value_problem(hint: Any, value: Any) -> str | None:
    """value_problem for a value as jsonargparse hands it over (a command line's text or a config's value), the
    items of a list, and a value none of a union of choices and plain types takes (`trainer.precision`)."""
    members = [m for m in typing.get_args(hint) if m is not type(None)] if _is_union(hint) else []
    nullable = type(None) in typing.get_args(hint) or hint is type(None)
    if value is None:
        return None if nullable or hint is None else f"expected {_expected(hint)}, got null"
    sequences = [m for m in members or [hint] if typing.get_origin(m) in _LISTS and not _class_bases(m)]
    if sequences:  # a list of numbers or of pairs (a list of classes is _class_option's)
        return _items_problem(sequences[0], value)
    if not isinstance(value, (str, int, float)) and all(_is_scalar(m) for m in members or [hint]):
        return f"expected {_expected(hint)}, got {_shown(value)}"  # a list or a mapping where one value is taken
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if hint is bool or members == [bool]:  # true or false (or null), as YAML says them
        return f"expected {_expected(hint)}, got {_shown(value)}" if str(value).lower() not in (
            "true", "false", *(["null"] if nullable else [])) else None
    if len(members) > 1 and all(typing.get_origin(m) is Literal or m in (bool, int, float) for m in members):
        return f"expected {_expected(hint)}, got {_shown(value)}"  # jsonargparse refused it: no member takes it
    return value_problem(hint, str(value))


def _items_problem(hint: Any, value: Any) -> str | None:
    """What is wrong with a list given for a list or tuple type: its length, or the first item that is wrong."""
    if isinstance(value, str):  # a list typed on the command line: read as jsonargparse reads it
        try:
            value = get_loader("yaml")(value)
        except Exception:  # noqa: BLE001 - not YAML: the type is said
            return f"expected {_expected(hint)}, got {_shown(value)}"
    if not isinstance(value, (list, tuple)):
        return f"expected {_expected(hint)}, got {_shown(value)}"
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and arguments and arguments[-1] is not Ellipsis:
        if len(value) != len(arguments):
            return f"expected {_expected(hint)}, got {_shown(value)}"
        typed = list(zip(arguments, value))
    else:
        typed = [(arguments[0] if arguments else Any, item) for item in value]
    return next((problem for item_hint, item in typed if item_hint is not Any
                 for problem in [_value_problem(item_hint, item)] if problem), None)


def _is_scalar(hint: Any) -> bool:
    """Whether a type takes one value: a number, a string, true or false, a choice, a range type."""
    return typing.get_origin(hint) is Literal or (inspect.isclass(hint) and issubclass(hint, (bool, int, float, str)))


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
        return (f"{'an integer' if rules[0] is int else 'a number'} "
                f"{' and '.join(f'{comparison} {bound}' for comparison, bound in rules[1])}")
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             Any: "any value"}
    if hint in words:
        return words[hint]
    if inspect.isclass(hint) and issubclass(hint, os.PathLike):
        return "a path"
    return f"a {hint.__name__} class path (with its init_args)" if inspect.isclass(hint) else str(hint)


def _shown(value: Any) -> str:
    """A given value as the user wrote it: the text of a command line; a config's value in JSON (YAML's flow form)."""
    nested = nested_option(value)
    if nested:
        return f"{nested[0]}={nested[1]}"
    return repr(value) if isinstance(value, str) else json.dumps(_plain(value), default=str)


def _plain(value: Any) -> Any:
    """A config's value with jsonargparse's Namespaces as mappings, at any depth."""
    mapping = _mapping(value)
    if mapping is not None:
        return {k: _plain(v) for k, v in mapping.items() if not str(k).startswith("__")}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _class_option(refusal: Refusal) -> str | None:
    """An option that takes a class with its options (`model.distillation`: a method's name or `class_path`;
    `trainer.logger`, `model.student`: a class path; `model.teacher`, `trainer.callbacks`: a list of them), else
    None."""
    key = refusal.key
    members = typing.get_args(refusal.hint) if _is_union(refusal.hint) else (refusal.hint,)
    names = [name for member in members if typing.get_origin(member) is Literal for name in typing.get_args(member)]
    bases = _class_bases(refusal.hint)
    if not bases:
        return None
    base = bases[0]
    listed = ", ".join(c.__name__ for c in _subclasses(base))
    classes = f": {listed}" if listed else ""
    named = f"one of {', '.join(map(repr, names))} or a {base.__name__} class" if names else f"a {base.__name__} class"
    value, previous = refusal.value, refusal.previous
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):  # YAML typed on the command line
        try:
            value = get_loader("yaml")(value)
        except Exception:  # noqa: BLE001 - not YAML after all: said as typed
            pass
    if isinstance(previous, list):  # `--key.option value` after a list sets the list's last class
        previous = previous[-1] if previous else None
    nested = nested_option(value)
    if nested:  # `--key CLASS --key.option value`, or `--key name --key.option value`
        option, given = nested
        found = _class(base, previous)
        if found:
            return _init_arg_problem(key, found, option, given, refused=True)
        taking = _taking(base, option)
        if not names:
            return None
        if not taking:
            return f"{key}: no method takes an option '{option}' (classes{classes or ': none'})"
        return (f"{key}: a method given by name takes no options of its own ('{option}'); give a class that "
                f"takes it, with them: --{key} CLASS --{key}.{option} VALUE (classes that take {option}: "
                f"{', '.join(taking)})")
    if isinstance(value, str):
        if value in names or _class(base, value):
            return None
        if "." in value or not names:  # a dotted path that names no class of this option: shown whole, with why
            return _no_class(key, base, value, f"{named}{classes}")
        return (f"{key}: {value or repr(value)} is not one of {', '.join(map(repr, names))} (or a {base.__name__} "
                f"class with its options{classes})")
    for item in value if isinstance(value, list) else [value]:
        problem = _given_class(key, base, item, None if isinstance(value, list) else previous, f"{named}{classes}")
        if problem:
            return problem
    return None


def _class_bases(hint: Any) -> list[type]:
    """The classes a `class_path` of an option of this type may name a subclass of (a list's items', a callable's
    return type's)."""
    members = typing.get_args(hint) if _is_union(hint) else (hint,)
    bases = [m for m in members if _is_class(m)]
    bases += [typing.get_args(m)[-1] for m in members if typing.get_origin(m) is collections.abc.Callable]
    bases += [typing.get_args(m)[0] for m in members if typing.get_origin(m) in _LISTS and typing.get_args(m)]
    return [b for b in bases if _is_class(b)]


def _given_class(key: str, base: type, item: Any, previous: Any, named: str) -> str | None:
    """What is wrong with one class given as a mapping (`class_path` and `init_args`; or options alone, for the
    class the option had before), or None."""
    given = _mapping(item)
    if given is None:
        return None
    path = given.get("class_path")
    options = {**(_mapping(given.get("init_args")) or {}),
               **{k: v for k, v in given.items() if k not in ("class_path", "init_args", "dict_kwargs", "__path__")}}
    found = _class(base, path if path is not None else previous)
    if path is None and found is None and options:  # `distillation.beta: 3` beside `distillation: DKD` in a file
        option = next(iter(options))
        field, taking = key.rpartition(".")[2], ", ".join(_taking(base, option)) or "none"
        return (f"{key}: an option ('{option}') without a class to take it (a dotted key `{field}.{option}` in a "
                f"file replaces the name beside it); give the class with its options: `{field}: {{class_path: CLASS, "
                f"init_args: {{{option}: VALUE}}}}` (classes that take {option}: {taking})")
    if found is None:
        return _no_class(key, base, path, named) if path is not None else None
    for option, value in options.items():
        problem = _init_arg_problem(key, found, option, value)
        if problem:
            return problem
    signature = inspect.signature(found).parameters.values()
    missing = [p.name for p in signature if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in options]
    if path is not None and missing:  # a class given whole (`--trainer.logger+=CSVLogger`) lacks an option it needs
        return f"{key}: {found.__name__}: {', '.join(missing)} must be given ({key}.init_args.{missing[0]})"
    return None


def _init_arg_problem(key: str, found: type, option: str, value: Any, refused: bool = False) -> str | None:
    """What is wrong with `option` of the class `found` given `value`: not one of its options, or out of its type
    (`refused`: jsonargparse refused this one value, so its type is said even where no check here finds why)."""
    signature = inspect.signature(found).parameters
    parameters = [p.name for p in signature.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    others = any(p.kind == p.VAR_KEYWORD for p in signature.values())
    if option not in parameters and others and not refused:  # jsonargparse may have taken it for the **kwargs
        return None
    if option not in parameters:
        return (f"{key}: {found.__name__}: Option '{option}' is not accepted (its options: {', '.join(parameters)}"
                f"{f'; others through --{key}.dict_kwargs.{option}' if others else ''})")
    try:
        hint = typing.get_type_hints(found.__init__).get(option)
    except (NameError, TypeError):  # an annotation that does not resolve here: the option's type is said instead
        return None
    problem = _value_problem(hint, value)
    if problem is None and refused and hint is not None:
        problem = f"expected {_expected(hint)}, got {_shown(value)}"
    return f"{key}.init_args.{option}: {problem}" if problem else None


_LISTS = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)


def _is_class(hint: Any) -> bool:
    """Whether a type is a class a `class_path` names (not a number, a string or a range type of them)."""
    return inspect.isclass(hint) and not issubclass(hint, (bool, int, float, str, type(None)))


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
        except (ImportError, AttributeError, ValueError, TypeError):  # TypeError: a relative path (`..X`)
            return None
    return found if inspect.isclass(found) and issubclass(found, base) else None


def _no_class(key: str, base: type, path: Any, named: str) -> str:
    """`key: 'X' names no class (why); give ...` for a class path that names none of this option's classes."""
    module, _, name = str(path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        return f"{key}: '{path}' names no class ({error}); give {named}"
    if found is not None:
        return f"{key}: '{path}' is not a {base.__name__} class; give {named}"
    return f"{key}: '{path}' names no class; give {named}"


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
    if key in names or key.rpartition(".")[2].startswith("__"):  # jsonargparse's own keys: __path__
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


def unknown_token(argv: list[str], parser: argparse.ArgumentParser) -> tuple[str, list[str]] | None:
    """The options of a command line that are no options of `parser` or its subcommands: the first one's name and
    all of them as typed, with their values (`model.lrr`, [`--model.lrr=1`, `--data.bs 2`]), else None."""
    names = option_names(parser) | {"config", "help"}
    unknown = [(key, typed) for key, typed in as_typed(argv)  # argparse takes a unique start of an option's name too
               if not _known(key, names) and not any(name.startswith(key) for name in names)]
    return (unknown[0][0], [typed for _, typed in unknown]) if unknown else None
