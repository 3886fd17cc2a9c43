"""README's code blocks as a newcomer runs them: every `distill` command names a command and only options that
command takes, every file it names ships, the Python lines run, and the serve example's picture is the digit its
answer names, with no pixel overflowed."""
from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from distill.cli import COMMANDS, TRAINING, cli_main
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def commands(word: str) -> list[list[str]]:
    """Each `word ...` command of README's bash blocks (continued lines joined, comments dropped)."""
    found = []
    for block in BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if words and words[0] == word:
                    found.append(words)
    return found


DISTILL = commands("distill")


@functools.lru_cache(maxsize=None)
def help_of(name: str) -> str:
    """`distill NAME --help`, run in this process (once a command)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
        cli_main([name, "--help"])
    return output.getvalue()


def test_readme_shows_the_commands_a_newcomer_needs():
    shown = {words[1] for words in DISTILL}
    assert {"pipeline", "compare", "serve", "predict"} <= shown


@pytest.mark.parametrize("words", DISTILL, ids=[" ".join(w[:3]) for w in DISTILL])
def test_every_distill_command_in_readme_is_a_command_with_options_it_takes_and_files_that_ship(words):
    name = words[1]
    assert name in COMMANDS or name in TRAINING, f"README runs `distill {name}`, which is not a command"
    for word in words:
        if word.startswith("configs/"):
            assert (ROOT / word).is_file(), f"README names {word}, which does not ship"
    if name in TRAINING:  # LightningCLI's options: the config's and --model.* keys are checked by its own tests
        return
    help_text = help_of(name)
    for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        own = option in help_text or option.replace("--no-", "--") in help_text
        passed_on = name in ("pipeline", "compare", "cache-teacher") and option.startswith(("--data.", "--model.",
                                                                                             "--trainer."))
        assert own or passed_on, f"README gives `distill {name} {option}`, which its --help does not list"


def test_the_serve_examples_picture_is_the_digit_its_answer_names_with_no_pixel_overflowed(tmp_path):
    (line,) = [words for words in commands("python") if "digit.png" in " ".join(words)]
    subprocess.run([sys.executable, *line[1:]], cwd=tmp_path, check=True, timeout=120)
    pixels = np.asarray(Image.open(tmp_path / "digit.png"))
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = (digits.images[-1] * 255 / 16).astype("uint8")  # 0..16 scans to 0..255
    assert pixels.max() == 255 and np.array_equal(pixels, expected)
    answer = re.search(r'"predictions": \[\{"label": "(\d)"', README)
    assert answer and int(answer.group(1)) == digits.target[-1]  # the answer shown names the digit in the picture
