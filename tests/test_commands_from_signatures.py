"""The commands outside LightningCLI take their options from the signatures of the functions they call: an option is
declared once (type with its range, default, help from the docstring), and a mistake is one line."""
import ast
import inspect
import re
from typing import Literal, Optional

import pytest

from distill.common.commandline import command
from distill.common.errors import UsageError
from distill.common.ranges import PositiveInt
from tests.helpers import ROOT


def job(config: list[str], jobs: PositiveInt = 2, mode: Literal["fast", "slow"] = "fast", overwrite: bool = False,
        onnx: bool = True, note: Optional[str] = None, extra: Optional[list[str]] = None) -> dict:
    """Do the job.

    Args:
        config: a config file; again for an overlay
        jobs: runs at once
        mode: how
        overwrite: replace what is there
        onnx: also write ONNX
        note: a note
        extra: the rest, for another command
    """
    return dict(config=config, jobs=jobs, mode=mode, overwrite=overwrite, onnx=onnx, note=note, extra=extra)


def test_options_come_from_the_signature_flags_lists_and_the_rest_included():
    main = command("distill job", job, extra="distill fit")
    got = main(["--config", "a.yaml", "--data.dataset", "DIR", "--config=b.yaml", "--overwrite", "--no-onnx",
                "--jobs", "3", "--trainer.max_epochs=2"])
    assert got == dict(config=["a.yaml", "b.yaml"], jobs=3, mode="fast", overwrite=True, onnx=False, note=None,
                       extra=["--data.dataset", "DIR", "--trainer.max_epochs=2"])
    assert main(["--config", "a.yaml"])["onnx"] is True


@pytest.mark.parametrize("argv, overwrite, onnx", [
    (["--overwrite=true", "--onnx=false"], True, False),  # as LightningCLI spells a bool
    (["--overwrite=yes", "--onnx=False"], True, False),
    (["--overwrite", "--overwrite=false", "--no-onnx=false"], False, True),  # the last one given wins
    (["--no-overwrite", "--no-onnx"], False, False),
    (["--overwrite", "true", "--onnx", "false"], True, False),  # a bool word after a flag is its value, not passed on
])
def test_a_flag_also_takes_true_or_false_as_its_value(argv, overwrite, onnx):
    got = command("distill job", job, extra="distill fit")(["--config", "a.yaml", *argv])
    assert (got["overwrite"], got["onnx"], got["extra"]) == (overwrite, onnx, [])


def test_help_shows_a_list_option_as_it_is_given_once_per_item(capsys):
    with pytest.raises(SystemExit):
        command("distill job", job)(["--help"])
    shown = capsys.readouterr().out
    assert "usage: distill job --config CONFIG" in shown and "--config CONFIG\n" in shown
    assert "ITEM" not in shown and "--config+" not in shown  # jsonargparse's spelling of adding an item


@pytest.mark.parametrize("argv, message", [
    (["--config", "a", "--jobs", "0"], "distill job: --jobs: 0 is out of range (accepted: > 0)"),
    (["--config", "a", "--mode", "medium"], "distill job: --mode: medium is not one of 'fast', 'slow'"),
    (["--jobs", "2"], "distill job: --config is required"),
    (["--config", "a", "--job", "2"], "unrecognized arguments: --job 2; did you mean '--jobs'?"),
    (["--config", "a", "--jobs", "two"], "distill job: --jobs: expected an integer, got 'two'"),
    (["--config", "a", "--overwrite=maybe"], "distill job: --overwrite is a flag: give it alone, or =true|false; got 'maybe'"),
    (["--config", "a", "--jobs", "2", "--mode", "fast", "--over-write"], "did you mean '--overwrite'?"),
])
def test_a_mistake_is_one_line_naming_the_option_and_what_is_accepted(argv, message):
    main = command("distill job", job)  # no `extra`: an unknown option is refused
    with pytest.raises(UsageError) as caught:
        main(argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).endswith("(distill job --help lists the options)")


def test_a_hyphenated_spelling_of_an_option_is_refused_not_passed_on_and_dashes_end_the_options():
    def label(top_k: PositiveInt = 10, extra: Optional[list[str]] = None) -> tuple:
        """Args:
            top_k: probabilities kept
        """
        return top_k, extra
    main = command("distill label", label, extra="distill fit")
    with pytest.raises(UsageError, match="--top-k: options are spelled with underscores; did you mean '--top_k'"):
        main(["--top-k", "3", "--data.dataset", "DIR"])  # not handed to fit, which would name another option
    assert main(["--top_k", "3", "--", "--top_k", "4"]) == (3, ["--top_k", "4"])  # after `--`: passed on whole


def test_a_positional_argument_given_as_an_option_is_named_as_positional_not_as_missing():
    def report(run_dir: str, smoothing: float = 0.6) -> tuple:
        """Args:
            run_dir: the run's folder
            smoothing: curve smoothing
        """
        return run_dir, smoothing
    main = command("distill report", report, positional=True)
    for argv in (["--run_dir", "runs/x"], ["--run-dir=runs/x"]):
        with pytest.raises(UsageError, match=re.escape("RUN_DIR is a positional argument; give its value alone "
                                                       "('runs/x', not '--run")):
            main(argv)
    assert main(["runs/x", "--smoothing", "0.5"]) == ("runs/x", 0.5)


def test_an_optional_number_names_its_own_complaint_in_one_line():
    def build(epochs: Optional[PositiveInt] = None) -> Optional[int]:
        """Args:
            epochs: how many
        """
        return epochs
    main = command("distill build", build)
    with pytest.raises(UsageError) as caught:
        main(["--epochs", "1.5"])
    assert "distill build: --epochs: expected an integer, got '1.5' (or null)" in str(caught.value)
    assert main(["--epochs", "3"]) == 3


def test_help_shows_each_option_with_its_docstring_range_and_default(capsys):
    with pytest.raises(SystemExit):
        command("distill job", job, extra="distill fit")(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for line in ("--jobs JOBS runs at once (type: PositiveInt, default: 2)", "--onnx, --no-onnx also write ONNX",
                 "--overwrite, --no-overwrite replace what is there", "Every other option goes to distill fit"):
        assert line in text


@pytest.mark.parametrize("name, functions", [
    ("serve", ["distill.commands.serve:make_server", "distill.deploy.serving_host:listen"]),
    ("export", ["distill.commands.export:export_student", "distill.commands.export:int8_request"]),
    ("predict", ["distill.commands.predict:predict_folder"]),
    ("compare", ["distill.commands.compare:compare"]),
    ("pipeline", ["distill.commands.pipeline:run_pipeline"]),
    ("cache-teacher", ["distill.commands.cache_teacher:cache_teacher"]),
    ("report", ["distill.commands.report:report_command"]),
])
def test_every_command_offers_exactly_the_parameters_of_the_functions_it_calls(name, functions, capsys):
    import importlib
    from distill.cli import cli_main
    argv = [name, "--export", "x", "--help"] if name == "predict" else [name, "--help"]
    with pytest.raises(SystemExit):
        cli_main(argv)
    text = capsys.readouterr().out
    usage = " ".join(text.split("\n\n")[0].split())  # `usage: distill NAME --a A [--b B] ...`: every option, once
    offered = set(re.findall(r"(?<![\w-])--(\w+)", usage)) | ({"run_dir"} if "run_dir" in usage else set())
    parameters = set()
    for spec in functions:
        module, function = spec.split(":")
        parameters |= set(inspect.signature(getattr(importlib.import_module(module), function)).parameters)
    skipped = {"extra"} | ({"int8"} if name == "export" else set())  # passed on; export_student's Int8 is int8_request's
    assert offered == (parameters - skipped) | ({"int8"} if name == "export" else set())


def test_no_command_declares_its_options_by_hand():
    """Options come from signatures (distill/common/commandline.py) or LightningCLI: nowhere an `add_argument`."""
    allowed = {ROOT / "distill" / "common" / "commandline.py", ROOT / "distill" / "training" / "cli.py"}
    found = []
    for path in sorted((ROOT / "distill").rglob("*.py")):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            name = getattr(called, "attr", None) or getattr(called, "id", None)
            if name in ("add_argument", "ArgumentParser"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"options declared by hand: {found}"


def _option_text(node: ast.AST) -> bool:
    """A str constant (or f-string) that spells an option: `--model.lr`, `-c`, `--{name}`."""
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("-") \
        and node.value != "-"


def test_no_code_reads_the_command_line_or_merges_config_files_beside_jsonargparse():
    """jsonargparse (LightningCLI for fit, commandline.py for the other commands) is the one reader of options: a
    token is looked at as an option only in distill/common/argv.py (the lookups taken before a parser exists) and
    commandline.py's splitter; sys.argv is read by the two entry points; YAML is read only where named below."""
    token_readers = {ROOT / "distill" / "common" / name for name in ("argv.py", "commandline.py")}
    argv_readers = {ROOT / "distill" / "cli.py", ROOT / "distill" / "training" / "cli.py"}
    yaml_readers = {
        "common/files.py": "load_yaml itself (a strict loader)",
        "common/configs.py": "checks that each --config file is a mapping before the imports",
        "commands/pipeline.py": "its own pipeline file, and a stage config's output options",
        "training/cli.py": "names the --config file that holds a mistaken key",
        "training/run_records.py": "reads a command-line value as YAML to compare it with a checkpoint's",
    }
    found = []
    for path in sorted((ROOT / "distill").rglob("*.py")):
        where = path.relative_to(ROOT / "distill").as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            line = f"{where}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                method, args = node.func.attr, node.args
                if path not in token_readers and (
                        method in ("startswith", "removeprefix") and args and _option_text(args[0])
                        or method in ("split", "partition") and args and isinstance(args[0], ast.Constant)
                        and args[0].value == "="):
                    found.append(f"{line} tests a token with .{method}")
                if method in ("safe_load", "full_load", "load") and getattr(node.func.value, "id", "") == "yaml" \
                        and where not in yaml_readers:
                    found.append(f"{line} reads YAML")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "load_yaml" and where not in yaml_readers:
                found.append(f"{line} reads YAML")
            if isinstance(node, ast.Compare) and path not in token_readers:
                sides = [node.left, *node.comparators]
                items = [e for s in sides for e in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s])]
                if any(_option_text(item) for item in items):
                    found.append(f"{line} compares a token with an option")
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys" \
                    and path not in argv_readers:
                found.append(f"{line} reads sys.argv")
    assert not found, f"options read beside jsonargparse: {found}"


def test_regular_expressions_read_no_option_parsers_words():
    """A library's message is text that its next release may reword: jsonargparse's is read nowhere (a refused fit
    option reaches distill/training/option_messages.py as objects, through adapters.record_refusals); the other
    regular expressions read the project's own input or a library's message that has nothing else, each for the
    reason named below."""
    allowed = {
        "common/files.py": "the errno a Rust library (safetensors) reports only in its message",
        "common/names.py": "the characters a name from a config may hold",
        "training/datamodule.py": "the sections of an --data.auto_augment policy, which timm skips silently",
        "data/images.py": "drops the object repr PIL puts in its message (a rewording only leaves it in the line)",
    }
    found = []
    for path in sorted((ROOT / "distill").rglob("*.py")):
        where = path.relative_to(ROOT / "distill").as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and where not in allowed and "re" in (
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]):
                found.append(f"{where}:{node.lineno}")
    assert not found, f"regular expressions outside the modules allowed to use them: {found}"
