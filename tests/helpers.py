"""Helpers shared by the tests: tiny models, generated data, the real configs shrunk to seconds, CLI errors.

The tests run the real configs with overrides (big_vision's "run locally" switch), never separate code paths.
"""
from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill.cli import cli_main
from students import Student

ROOT = Path(__file__).resolve().parents[1]

# A DeiT student small enough for CPU tests in seconds: 32 px, patch 8, width 32, depth 2.
TINY_STUDENT = dict(model_name="deit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_TEACHER = "test_resnet"  # timm's 0.4M-parameter ResNet used for its own tests


def tiny_student(num_classes: int = 10, img_size: int = 32) -> Student:
    return Student(num_classes, img_size, **TINY_STUDENT)


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 6) -> Path:
    """An ImageNet-layout tree root/{train,val}/<class>/*.png of small coloured images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
                pixels[..., index % 3] += 150  # each class has its own dominant colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def shrink(tmp_path: Path, config: str) -> list[str]:
    """A real config, made seconds-long: tiny student, a few batches, outputs in tmp_path."""
    args = ["--config", str(ROOT / "configs" / config), "--data.num_workers=0", "--data.batch_size=16",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    if config == "distill.yaml":
        args += [f"--model.student.init_args.{k}={v}" for k, v in TINY_STUDENT.items()]
    else:
        args += [f"--model.student.init_args.model_name={TINY_TEACHER}"]
    return args


def scalars(log_root: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(next(log_root.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def random_teacher_file(folder: Path, model_name: str = TINY_TEACHER, num_classes: int = 10,
                        name: str | None = None) -> Path:
    """Random (seed 0, so the same in every test) weights of a timm model, as a safetensors teacher file."""
    torch.manual_seed(0)
    path = folder / (name or f"{model_name}_{num_classes}.safetensors")
    save_file(timm.create_model(model_name.split(".")[0], num_classes=num_classes).state_dict(), str(path))
    return path


def config_overrides(config: Path, tmp_path: Path) -> list[str]:
    """Point a config's outputs into tmp_path, and its teacher (if any) at random weights."""
    args = ["--config", str(config), "--data.num_workers=0", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    teacher = (yaml.safe_load(config.read_text()).get("model") or {}).get("teacher")
    if teacher:
        path = random_teacher_file(tmp_path, teacher["init_args"]["model_name"], 10)
        args.append(f"--model.teacher.init_args.weights={path}")
    return args


TINY_SWIN = dict(model_name="swin_tiny_patch4_window7_224", patch_size=4, window_size=4, embed_dim=16, depths=[1, 1],
                 num_heads=[1, 2], distill_head=True)


def train_tiny(tmp: Path, config: str = "distill.yaml", student_args: tuple[str, ...] = ()) -> Path:
    """A teacher, then a tiny student distilled from it at 32 px, on a generated 3-class folder in `tmp`."""
    data = [f"--data.dataset={make_image_folder(tmp / 'images', per_class=16)}", "--data.batch_size=8"]
    cli_main(["fit", *shrink(tmp / "teacher", "teacher.yaml"), *data, "--trainer.limit_train_batches=1.0",
              "--trainer.max_epochs=3"])
    cli_main(["fit", *shrink(tmp, config), *student_args, *data, "--trainer.limit_train_batches=1.0",
              "--trainer.limit_val_batches=1.0", "--trainer.max_epochs=4", "--model.warmup_epochs=0.5",
              *teacher_of(tmp)])
    return tmp


def teacher_of(trained: Path) -> list[str]:
    return [f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={trained / 'teacher' / 'ckpt' / 'best.ckpt'}"]


def data_of(trained: Path) -> list[str]:
    return [f"--data.dataset={trained / 'images'}", "--data.batch_size=8"]


# ---------------------------------------------------------------------------------------------
# Bad input: one line `error: ...` naming the option or file, exit 2, nothing written.


def run_cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def distill_args(tmp_path: Path, teacher_classes: int = 10) -> list[str]:
    return ["fit", *config_overrides(ROOT / "configs/distill.yaml", tmp_path)[:-1], "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            *[f"--model.student.init_args.{k}={v}" for k, v in TINY_STUDENT.items()],
            f"--model.teacher.init_args.model_name={TINY_TEACHER}",
            f"--model.teacher.init_args.weights={random_teacher_file(tmp_path, TINY_TEACHER, teacher_classes)}"]


@contextlib.contextmanager
def small_filesystem(folder: Path, options: str):
    """`folder` as the mount point of a tmpfs with `options` (e.g. `ro,size=64k`), unmounted after; the test is
    skipped where mounting is not allowed (not root, or no CAP_SYS_ADMIN in a container)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Write into `folder` until its filesystem has no free block (a new empty file can still be made, as on a real
    full disk: its first byte fails)."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes (to check that nothing was written, removed or changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def nothing_written(tmp_path: Path) -> bool:
    return not list((tmp_path / "ckpt").glob("*.ckpt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


# The ImageNet recipe and the files layered on it, as a user passes them (several --config, merged in order).
IMAGENET_RUNS = {
    "deit_tiny": ("deit_distilled.yaml",),
    "deit_small": ("deit_distilled.yaml", "deit_small.yaml"),
    "deit_base": ("deit_distilled.yaml", "deit_base.yaml"),
    "finetune_384": ("deit_distilled.yaml", "deit_base.yaml", "finetune_384.yaml"),
    "swin_tiny": ("deit_distilled.yaml", "swin_tiny.yaml"),
}


def imagenet_configs(run: str) -> list[str]:
    """The --config arguments of one ImageNet run."""
    return [arg for name in IMAGENET_RUNS[run] for arg in ("--config", str(ROOT / "configs" / "imagenet" / name))]


def merged_config(run: str) -> dict:
    """The YAML of one ImageNet run's files merged key by key, later files winning (what jsonargparse does)."""
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict = {}
    for name in IMAGENET_RUNS[run]:
        config = merge(config, yaml.safe_load((ROOT / "configs" / "imagenet" / name).read_text()))
    return config


# ---------------------------------------------------------------------------------------------
# Servers and processes (tests of distill serve)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def children_of(pid: int) -> set[int]:
    """Every descendant process of `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def describe(pid: int) -> str:
    try:
        state = (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return f"{pid} {state} {(Path(f'/proc/{pid}') / 'cmdline').read_bytes().replace(bytes(1), b' ')[:120]!r}"
    except OSError:
        return f"{pid} gone"


def wait_gone(pids: set[int], seconds: float) -> list[int]:
    """The processes of `pids` still running (zombies count as gone) after waiting up to `seconds`."""
    deadline = time.time() + seconds
    while True:
        alive = [pid for pid in pids if " Z " not in describe(pid) and not describe(pid).endswith("gone")]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def wait_healthy(server, url: str, seconds: float) -> None:
    """Wait for a `distill serve` process to answer `GET /health` with ok (it must not exit meanwhile)."""
    deadline = time.time() + seconds
    while True:
        assert server.poll() is None, server.stdout.read()
        try:
            if requests.get(f"{url}/health", timeout=2).text == "ok":
                return
        except requests.ConnectionError:
            pass
        assert time.time() < deadline, f"the server did not come up in {seconds:.0f} s"
        time.sleep(0.3)
