"""The commands outside LightningCLI (export, predict, serve, report, compare, pipeline, cache-teacher), parsed
from the signatures of the functions they call.

    main = command("distill predict", predict_folder, run=_print_summary)

jsonargparse reads each parameter's type (its range: `PositiveInt`, a `Literal` of choices), its default and
its help (the function's docstring, the "Args:" section), so an option is declared once, on the function, and
`distill COMMAND --help` shows it. What jsonargparse does not do for a function's signature, done here once:
- a `bool` parameter is a flag, as argparse users expect (`--overwrite`, `--no-onnx`; `--onnx=false` as
  LightningCLI spells it), where jsonargparse would ask for `--overwrite true`;
- a `list` parameter may be repeated (`--config a.yaml --config b.yaml`), each time adding an item;
- a command that hands the rest of its command line on (compare, pipeline and cache-teacher: to `distill fit`)
  gets the options no function declares as `options["extra"]` (jsonargparse has no `parse_known_args`);
- a mistake is one `UsageError` line naming the option and what is accepted (`--port: 80 is out of range
  (accepted: >= 1024 and <= 65535)`), not a page of usage.
"""
from __future__ import annotations

import difflib
import inspect
import operator
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, NoReturn

import docstring_parser
from jsonargparse import ActionYesNo, ArgumentParser

from distill.common.argv import given, is_option, name_of
from distill.common.errors import UsageError
from distill.common.ranges import accepted

__all__ = ["call", "command", "value_problem"]


class CommandParser(ArgumentParser):
    """jsonargparse's parser whose mistakes are one `UsageError` line (printed by `distill.cli.cli_main`)."""

    list_names: list[str] = []

    def format_help(self) -> str:
        return self._repeatable(super().format_help())

    def format_usage(self) -> str:
        return self._repeatable(super().format_usage())

    def _repeatable(self, text: str) -> str:
        """A list option as the user gives it (`--config CONFIG`, again for more), not as jsonargparse adds an item."""
        for name in self.list_names:
            for shown in (f"--{name} [ITEM,...], --{name}+ [ITEM,...]", f"--{name} [ITEM,...]"):
                text = text.replace(shown, f"--{name} {name.upper()}")
        return text

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        """A mistake as one line. The ones users make (an unknown or missing option, a number out of its range, a
        choice not offered) are found before jsonargparse (`_split`, `_check_value`, `_check_required`) and named
        there; what jsonargparse alone finds is its own message, on one line."""
        raise UsageError(f"{self.prog}: {' '.join(line.strip() for line in str(message).splitlines() if line.strip())}"
                         f"  ({self.prog} --help lists the options)")


def _parameters(function: Callable, skip: set[str]) -> dict[str, tuple[inspect.Parameter, Any]]:
    """The function's options: name -> (parameter, resolved type), without `skip` and *args / **kwargs."""
    hints = typing.get_type_hints(function)
    return {name: (p, hints.get(name, Any)) for name, p in inspect.signature(function).parameters.items()
            if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def command(prog: str, *functions: Callable, run: Callable[[dict[str, Any]], Any] | None = None,
            skip: tuple[str, ...] = (), positional: bool = False, extra: str | None = None,
            description: str | None = None, epilog: str | None = None) -> Callable[[list[str] | None], Any]:
    """A command's `main(argv)`: its options are the parameters of `functions` (a name in several is one option, declared
    by the first), minus `skip` (`name`, or `function.name` for one function's); `run(options)` does the work (default:
    the one function, called with them).

    positional: required parameters are positional arguments (`distill report RUN_DIR`), not `--name VALUE`.
    extra: the command passes the options no function declares on (to `distill fit`), as `options["extra"]`; this
        says where, in `--help`. Without it such an option is refused, with a close match.
    epilog: a line `--help` prints after the options.
    """
    if run is None and len(functions) != 1:
        raise TypeError("command: give `run` when the options come from several functions")
    doc = inspect.getdoc(functions[0]) or ""

    def main(argv: list[str] | None = None) -> Any:
        parser = CommandParser(prog=prog, description=description or doc.split("\n\n")[0], exit_on_error=False,
                               epilog=" ".join(filter(None, [f"Every other option goes to {extra}." if extra else None,
                                                             epilog])) or None)
        declared: dict[str, tuple[inspect.Parameter, Any]] = {}
        for function in functions:
            skipped = {s for s in skip if "." not in s} | {s.split(".", 1)[1] for s in skip
                                                            if s.startswith(f"{function.__name__}.")}
            own = {k: v for k, v in _parameters(function, skipped | set(declared)).items() if k != "extra"}
            helps = {p.arg_name: p.description for p in docstring_parser.parse(inspect.getdoc(function) or "").params}
            flags = [name for name, (_, hint) in own.items() if hint is bool]
            parser.add_function_arguments(function, as_group=False, as_positional=positional,
                                          skip=skipped | set(declared) | set(flags) | {"extra"})
            for name in flags:  # a pair: --onnx / --no-onnx
                default = own[name][0].default
                parser.add_argument(f"--{name}", action=ActionYesNo(no_prefix="no-"),
                                    default=bool(default), help=helps.get(name))
            declared.update(own)
        required = [n for n, (p, _) in declared.items() if p.default is inspect.Parameter.empty]
        lists = {name for name, (_, hint) in declared.items() if typing.get_origin(hint) is list}
        parser.list_names = sorted(lists)
        flags = {name for name, (_, hint) in declared.items() if hint is bool}
        mine, rest, arguments = _split(list(argv or []), declared, flags, lists, positional, parser.error)
        if rest and not extra:
            unknown = next((arg for arg in rest if is_option(arg)), rest[0])
            close = difflib.get_close_matches(name_of(unknown), [f"--{n}" for n in declared], n=1)
            parser.error(f"unrecognized arguments: {' '.join(rest)}" + (f"; did you mean '{close[0]}'?" if close else ""))
        if "-h" not in mine and "--help" not in mine:
            _check_required(declared, mine, required if positional else [], arguments, parser.error)
        options = parser.parse_args(mine).as_dict()
        if extra:
            options["extra"] = rest
        return (run or (lambda o: call(functions[0], o)))(options)

    main.__doc__ = f"`{prog}`: " + (doc.split("\n\n")[0] or prog)
    return main


def _split(argv: list[str], declared: dict, flags: set[str], lists: set[str], positional: bool,
           error: Callable[[str], NoReturn]) -> tuple[list[str], list[str], int]:
    """argv as (what the parser takes, the rest, how many positional arguments it gives): a list option repeated adds
    an item (jsonargparse's `--name+`); a value its option's type refuses is an `error`."""
    known = {f"--{n}" for n in declared} | {f"--no-{n}" for n in flags} | {"-h", "--help"}
    mine, rest, index, arguments = [], [], 0, 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":  # what follows is not options: positional arguments (the parser sees the `--` too), or
            # options passed on whole
            (mine if positional else rest).extend(argv[index - 1 if positional and index < len(argv) else index:])
            arguments += len(argv) - index if positional else 0
            break
        name, equals, value = arg.partition("=")
        if not arg.startswith("-") or arg == "-":
            (mine if positional else rest).append(arg)  # a positional argument, or the value of an option passed on
            arguments += positional
            continue
        option = name.removeprefix("--").replace("-", "_")
        if positional and option in declared and declared[option][0].default is inspect.Parameter.empty:
            shown = value if equals else (argv[index] if index < len(argv) else "")
            shown = option.upper() if not shown or is_option(shown) else shown
            error(f"{name}: {option.upper()} is a positional argument; give its value alone ('{shown}', not "
                  f"'{name} {shown}')")
        if name not in known:
            underscored = name[:2] + name[2:].replace("-", "_")
            if underscored in known and underscored != name:  # --top-k for --top_k: not an option to pass on
                error(f"{name}: options are spelled with underscores; did you mean '{underscored}'?")
            rest.append(arg)
            continue
        option = name.removeprefix("--")
        target = f"--{option}+" if option in lists else name
        if equals and (option in flags or name.startswith("--no-")):  # --onnx=false, as LightningCLI spells a bool
            mine.append(_flag(name, value, flags, error))
        elif option in flags and index < len(argv) and argv[index].lower() in ("true", "false", "yes", "no"):
            # --onnx false: the word is the flag's value, not a positional argument or an option passed on
            mine.append(_flag(name, argv[index], flags, error))
            index += 1
        elif equals:
            _check_value(option, declared[option][1], value, error)
            mine.append(f"{target}={value}")
        elif option in flags or name.startswith("--no-") or name in ("-h", "--help") or index >= len(argv):
            mine.append(target)
        else:
            _check_value(option, declared[option][1], argv[index], error)
            mine += [target, argv[index]]
            index += 1
    return mine, rest, arguments


def _check_required(declared: dict, mine: list[str], positional: list[str], arguments: int,
                    error: Callable[[str], NoReturn]) -> None:
    """`NAME is required` for the first `positional` argument beyond the `arguments` given, else `--option is
    required` for the first option without a default that the command line leaves out."""
    if len(positional) > arguments:
        error(f"{positional[arguments].upper()} is required")
    for name, (parameter, _) in declared.items():
        if (parameter.default is inspect.Parameter.empty and name not in positional
                and not given(mine, f"--{name}", f"--{name}+")):
            error(f"--{name} is required")


def _check_value(option: str, hint: Any, text: str, error: Callable[[str], NoReturn]) -> None:
    """`--option: what is wrong` for a value its type refuses, before jsonargparse (whose messages name the option
    only in their text): a number, its range, a choice; other types are left to jsonargparse."""
    items = typing.get_args(hint) if typing.get_origin(hint) is list else ()
    problem = value_problem(items[0] if items else hint, text)
    if problem:
        error(f"--{option}: {problem}")


_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_NULL = ("null", "Null", "NULL", "~")  # YAML's null, as jsonargparse reads an option's value


def value_problem(hint: Any, text: str) -> str | None:
    """What is wrong with `text` as a value of `hint` (an int or float, a range type of distill.common.ranges, a
    Literal, any of them or None), or None: nothing wrong, or a type this does not check."""
    choices = [a for a in typing.get_args(hint) if a is not type(None)]
    nullable = len(choices) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType)
    if nullable:
        if text in _NULL:
            return None
        hint = choices[0]
    if typing.get_origin(hint) is Literal:
        names = typing.get_args(hint)
        return None if text in [str(n) for n in names] else f"{text} is not one of {', '.join(map(repr, names))}"
    rules = accepted(hint)
    base = rules[0] if rules else hint if hint in (int, float) else None
    if base is None:
        return None
    or_null = " or null" if nullable else ""
    try:
        number = float(text) if base is float else int(text)  # jsonargparse refuses `1e2` and `2.0` for an int too
    except ValueError:
        return f"expected {'an integer' if base is int else 'a number'}, got {text!r}" + (" (or null)" if nullable else "")
    if rules and not all(_COMPARE[comparison](number, bound) for comparison, bound in rules[1]):
        rule = " and ".join(f"{comparison} {bound}" for comparison, bound in rules[1])
        return f"{text} is out of range (accepted: {rule}{or_null})"
    return None


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _flag(name: str, value: str, flags: set[str], error: Callable[[str], NoReturn]) -> str:
    """`--x=true` as `--x`, `--x=false` as `--no-x` (`--no-x=false` as `--x`); any other value is refused."""
    option = name.removeprefix("--no-") if name.startswith("--no-") else name.removeprefix("--")
    if value.lower() not in _TRUE + _FALSE:
        error(f"--{option} is a flag: give it alone, or ={'|'.join(('true', 'false'))}; got {value!r}")
    on = (value.lower() in _TRUE) != name.startswith("--no-")
    return f"--{option}" if on else f"--no-{option}"


def call(function: Callable, options: dict[str, Any]) -> Any:
    """`function` called with those of `options` that are its parameters."""
    names = inspect.signature(function).parameters
    return function(**{k: v for k, v in options.items() if k in names})
