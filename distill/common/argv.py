"""The one place that reads command-line tokens outside jsonargparse: whether an option is given, and its values.

jsonargparse parses and merges options (LightningCLI for `distill fit`, `distill.common.commandline` for the other
commands, whose `_split` hands a driver's unknown options on to `distill fit`). These lookups serve the decisions
taken before a parser exists or that a parsed config cannot answer: which command runs (`distill/cli.py`), the
config files checked before the imports (`distill/common/configs.py`), options a driver sets itself and refuses
(compare, pipeline), and options a checkpoint would override. An `--key+=value` (jsonargparse's append) is `--key`.

    given(["--config", "a.yaml", "--model.lr=1e-3"], "--model.lr")      -> True
    values(["-c", "a.yaml", "--config=b.yaml"], "--config", "-c")       -> ["a.yaml", "b.yaml"]
    pairs(["--model.lr", "1e-3", "--model.tau=2"], "--model.")          -> [("--model.lr", "1e-3"), ("--model.tau", "2")]
    under(["--model.lr", "1e-3", "--model.tau=2"], "model")             -> {"lr": "1e-3", "tau": "2"}
"""
from __future__ import annotations

__all__ = ["as_typed", "given", "is_option", "last_value", "name_of", "pairs", "under", "values"]


def is_option(arg: str) -> bool:
    """Whether a token is an option (`-c`, `--key`, `--key=value`), not a value or a command's name."""
    return arg.startswith("-") and arg != "-"


def name_of(arg: str) -> str:
    """The option a token names: `--key` of `--key=value` and of `--key+=value`; a value is itself."""
    return arg.split("=", 1)[0].removesuffix("+") if is_option(arg) else arg


def pairs(argv: list[str], prefix: str) -> list[tuple[str, str | None]]:
    """(option, value) for each option of `argv` whose name starts with `prefix`, in order: `--key=value` and
    `--key value` alike (None: the option ends the command line, or another option follows it)."""
    found = []
    for index, arg in enumerate(argv):
        name = name_of(arg)
        if not is_option(arg) or not name.startswith(prefix):
            continue
        if "=" in arg:
            found.append((name, arg.split("=", 1)[1]))
        else:
            following = argv[index + 1] if index + 1 < len(argv) else None
            found.append((name, following if following is not None and _value(following) else None))
    return found


def as_typed(argv: list[str]) -> list[tuple[str, str]]:
    """(key, the option as typed) of each `--key` option of `argv`: `model.lr` with `--model.lr=1`, `--model.lr 1`
    or `--model.lr` (a flag, or no value given)."""
    found = []
    for option, value in pairs(argv, "--"):
        joined = [f"{option}{sign}={value}" for sign in ("", "+") if f"{option}{sign}={value}" in argv]
        typed = option if value is None else joined[0] if joined else f"{option} {value}"
        found.append((option.removeprefix("--"), typed))
    return found


def under(argv: list[str], key: str) -> dict[str, str]:
    """The values `argv` gives to the options below `key` (`--model.lr` for `model`), by their name below it."""
    return {name.removeprefix(f"--{key}."): found for name, found in pairs(argv, f"--{key}.") if found is not None}


def _value(token: str) -> bool:
    """Whether a token after an option is its value: not an option, unless a negative number (`--lr -1`)."""
    try:
        return not is_option(token) or float(token) < 0
    except ValueError:
        return False


def given(argv: list[str], *options: str) -> bool:
    """Whether `argv` gives one of `options` (with a value or as a flag)."""
    return any(is_option(arg) and name_of(arg) in options for arg in argv)


def values(argv: list[str], *options: str) -> list[str]:
    """The values `argv` gives to any of `options` (names of one option, e.g. `--config`, `-c`), in order."""
    return [found for option, found in pairs(argv, "-") if option in options and found is not None]


def last_value(argv: list[str], *options: str) -> str | None:
    """The last value `argv` gives to any of `options` (the one a parser keeps), or None."""
    found = values(argv, *options)
    return found[-1] if found else None
