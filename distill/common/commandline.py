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
import importlib
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, NoReturn

import docstring_parser
from jsonargparse import ActionYesNo, ArgumentParser

from distill.common.errors import UsageError

__all__ = ["call", "command", "one_line", "out_of_range"]


class CommandParser(ArgumentParser):
    """jsonargparse's parser whose mistakes are one `UsageError` line (printed by `distill.cli.cli_main`)."""

    option_names: list[str] = []
    positional_names: list[str] = []
    list_names: list[str] = []

    def format_help(self) -> str:
        return self._repeatable(super().format_help())

    def format_usage(self) -> str:
        return self._repeatable(super().format_usage())

    def _repeatable(self, text: str) -> str:
        """A list option as the user gives it (`--config CONFIG`, again for more), not as jsonargparse adds an item."""
        for name in self.list_names:
            text = re.sub(rf"--{re.escape(name)} \[ITEM,\.\.\.\](, --{re.escape(name)}\+ \[ITEM,\.\.\.\])?",
                          f"--{name} {name.upper()}", text)
        return text

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        text = one_line(message)
        for name in self.option_names:  # jsonargparse names a key by its parameter: the user typed --key
            text = re.sub(rf"^{re.escape(name)}:", f"--{name}:", text)
        required = re.match(r"the following arguments are required: (.+)", text)
        if required:
            names = [n.strip() for n in required.group(1).split(",")]
            text = f"{', '.join(n.upper() if n in self.positional_names else f'--{n}' for n in names)} is required"
        typo = re.search(r"unrecognized arguments: (--[\w.-]+)", text)
        close = difflib.get_close_matches(typo.group(1), [f"--{n}" for n in self.option_names], n=1) if typo else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"{self.prog}: {text}{hint}  ({self.prog} --help lists the options)")


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
    if problem:  # the class was found: its own complaint, and the options it takes
        found = _import(problem.group(1))
        accepted = ", ".join(inspect.signature(found).parameters) if found else ""
        return f"{key}: {problem.group(1).rpartition('.')[2]}: {problem.group(2)}" + (f" (its options: {accepted})"
                                                                                    if accepted else "")
    nested = re.match(r"NestedArg\(key='([\w.]+)'", given)
    if nested:  # `--key name --key.option v`: a name takes no options of its own, its class does
        return (f"{key}: a method given by name takes no options of its own ('{nested.group(1)}'); give its class "
                f"with them, e.g. --{key} DKD --{key}.{nested.group(1)} VALUE (classes: {classes})")
    return f"{key}: {given} is not one of {names} (or a {base_name} class with its options: {classes})"


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
        parser.option_names = list(declared)
        if positional:
            parser.positional_names = [n for n, (p, _) in declared.items() if p.default is inspect.Parameter.empty]
        lists = {name for name, (_, hint) in declared.items() if typing.get_origin(hint) is list}
        parser.list_names = sorted(lists)
        flags = {name for name, (_, hint) in declared.items() if hint is bool}
        mine, rest = _split(list(argv or []), declared, flags, lists, positional, parser.error)
        if rest and not extra:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        options = parser.parse_args(mine).as_dict()
        if extra:
            options["extra"] = rest
        return (run or (lambda o: call(functions[0], o)))(options)

    main.__doc__ = f"`{prog}`: " + (doc.split("\n\n")[0] or prog)
    return main


def _split(argv: list[str], declared: dict, flags: set[str], lists: set[str], positional: bool,
           error: Callable[[str], NoReturn]) -> tuple[list[str], list[str]]:
    """argv as (what the parser takes, the rest): a list option repeated adds an item (jsonargparse's `--name+`)."""
    known = {f"--{n}" for n in declared} | {f"--no-{n}" for n in flags} | {"-h", "--help"}
    mine, rest, index = [], [], 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":  # what follows is not options: positional arguments (the parser sees the `--` too), or
            # options passed on whole
            (mine if positional else rest).extend(argv[index - 1 if positional and index < len(argv) else index:])
            break
        name, equals, value = arg.partition("=")
        if not arg.startswith("-") or arg == "-":
            (mine if positional else rest).append(arg)  # a positional argument, or the value of an option passed on
            continue
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
            mine.append(f"{target}={value}")
        elif option in flags or name.startswith("--no-") or name in ("-h", "--help") or index >= len(argv):
            mine.append(target)
        else:
            mine += [target, argv[index]]
            index += 1
    return mine, rest


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
