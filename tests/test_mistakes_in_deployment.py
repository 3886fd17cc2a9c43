"""Mistakes made when deploying a student, each refused in one line or answered as documented (issue 25):

- an export folder whose files disagree or are damaged (fewer label_names than classes, a num_classes
  its head does not have, a config.json that is not JSON or not a mapping, an input size or a std the
  preprocessing cannot use, weights of another architecture): `predict` and `serve` refuse it at start,
  before anything is written or "serving ..." is printed, and an earlier predictions CSV is kept;
- an ONNX / INT8 model whose input or output shape disagrees with the export's config.json;
- `serve --accelerator cuda` (or mps) on a machine that has no such device;
- an image whose header declares more pixels than PIL's decompression-bomb limit (about 179 Mpx):
  413 as documented, not 400; and a --max_pixels above that limit, which PIL would overrule;
- `kill -9` (or the OOM killer) on `distill serve`: its API servers and inference processes die with
  it and the port is free again;
- `report --plot` of runs `teacher/version_0` and `teacher_version_0`: two PNGs, and neither is replaced
  by a later call without --overwrite.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.torch import load_file, save_file
from starlette.datastructures import FormData, UploadFile
from torch.utils.tensorboard import SummaryWriter

from distill.cli import cli_main
from distill.deploy.export import export_student
from distill.deploy.serve import Rejected, StudentAPI, accelerators_here
from tests.helpers import children_of, describe, free_port, png, run_cli_error, wait_gone, wait_healthy


@pytest.fixture(scope="module")
def export(trained, tmp_path_factory) -> Path:
    """The tiny student's export (timm folder and ONNX): every test corrupts a copy of it, never it."""
    out = tmp_path_factory.mktemp("deployment") / "export"
    export_student(trained / "ckpt" / "best.ckpt", out, torchscript=False)
    return out


def copy_of(export: Path, folder: Path, damage: Callable[[Path], None] | None = None) -> Path:
    """A copy of the export, damaged by `damage`."""
    copy = Path(shutil.copytree(export, folder))
    if damage is not None:
        damage(copy)
    return copy


def config_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A damage: config.json changed by `edit`."""
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def config_text(text: str) -> Callable[[Path], None]:
    """A damage: config.json replaced by `text`."""
    return lambda folder: (folder / "config.json").write_text(text)


def without_a_tensor(folder: Path) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    del weights["blocks.1.norm1.weight"]
    save_file(weights, str(folder / "model.safetensors"))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (its data is a 1x1 image's, never reached)."""
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the CRC of the chunk's type and data
    return bytes(data)


def onnx_model(path: Path, size: int, classes: int) -> None:
    """A valid ONNX model from `images` [batch, 3, size, size] to `logits` [batch, classes] (Flatten, MatMul)."""
    weights = numpy_helper.from_array(np.zeros((3 * size * size, classes), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "wrong_shapes", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # one every ONNX Runtime release reads
    onnx.save(model, str(path))


def serve_refuses(args: list[str], capsys) -> str:
    """The one `error:` line of `distill serve` with `args` on a free port: exit code 2, and "serving ..." never
    printed (`run_cli_error`, with the standard output kept)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--port", str(free_port()), *args])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "serving" not in out, out
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# An export is validated whole when it is loaded


def test_an_export_with_fewer_label_names_than_classes_is_refused_by_predict_and_serve_and_keeps_the_csv(
        export, trained, tmp_path, capsys):
    broken = copy_of(export, tmp_path / "broken", config_edit(lambda config: config.update(label_names=["cat", "dog"])))
    expected = f"--export: '{broken / 'config.json'}' label_names: 2 names for num_classes 3 (one name per class)"
    earlier = tmp_path / "predictions.csv"
    earlier.write_text("path,class_1,prob_1,error\nan earlier run's row\n")
    line = run_cli_error(["predict", "--export", str(broken), "--images", str(trained / "images" / "val"),
                          "--out", str(earlier), "--overwrite"], capsys)
    assert expected in line
    assert earlier.read_text() == "path,class_1,prob_1,error\nan earlier run's row\n"
    assert expected in serve_refuses(["--export", str(broken)], capsys)


@pytest.mark.parametrize("damage, expected", [
    (config_edit(lambda c: c.update(num_classes=5, label_names=list("abcde"),
                                    model_args={**c["model_args"], "num_classes": 5})),
     "'{export}' num_classes: 5 in config.json, but the head 'head.weight' in model.safetensors has 3 rows"),
    (config_edit(lambda c: c.update(num_classes=5)),
     "'{export}/config.json' model_args.num_classes: 3, expected the same as num_classes, 5"),
    (config_edit(lambda c: c["pretrained_cfg"].update(input_size=[3, 48, 48])),
     "'{export}/config.json' pretrained_cfg.input_size: [3, 48, 48], but its model_args build a model for "
     "[3, 32, 32]"),
    (config_edit(lambda c: c["pretrained_cfg"].update(std=[0.2, 0.0, 0.2])),
     "'{export}/config.json' pretrained_cfg.std: [0.2, 0.0, 0.2], expected 3 finite numbers (one per RGB channel), "
     "each above 0"),
    (config_edit(lambda c: c.update(architecture="resnet_nonexistent")),
     "'{export}/config.json' architecture: 'resnet_nonexistent', expected the name of a timm model"),
    (config_text("[1, 2, 3]"), "'{export}/config.json' holds a JSON list, not a mapping of fields"),
    (config_text('{"architecture": '), "'{export}/config.json' is not readable JSON (JSONDecodeError: "),
    (without_a_tensor, "'{export}/model.safetensors' does not hold the tensors of architecture "
                       "'deit_tiny_distilled_patch16_224' that config.json names: 1 missing (e.g. "
                       "'blocks.1.norm1.weight')"),
], ids=["head_rows", "model_args", "input_size", "std", "architecture", "not_a_mapping", "not_json", "weights"])
def test_an_export_whose_files_disagree_is_one_line_naming_the_field_and_both_values(export, trained, tmp_path, capsys,
                                                                                     damage, expected):
    broken = copy_of(export, tmp_path / "broken", damage)
    line = run_cli_error(["predict", "--export", str(broken), "--images", str(trained / "images" / "val"),
                          "--out", str(tmp_path / "predictions.csv")], capsys)
    assert f"error: --export: {expected.format(export=broken)}" in line and "run distill export again" in line
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.parametrize("backend, size, classes, expected", [
    ("onnx", 48, 3, "model.onnx' takes 'images' ['batch', 3, 48, 48], but '{config}' input_size is [3, 32, 32]"),
    ("int8", 32, 5, "model.int8.onnx' gives ['batch', 5], but '{config}' num_classes is 3 (expected [batch, 3])"),
], ids=["onnx_input", "int8_output"])
def test_an_onnx_model_of_other_shapes_than_its_config_is_refused_before_serving(export, tmp_path, capsys, backend,
                                                                                  size, classes, expected):
    broken = copy_of(export, tmp_path / "broken")
    onnx_model(broken / ("model.onnx" if backend == "onnx" else "model.int8.onnx"), size, classes)
    line = serve_refuses(["--export", str(broken), "--backend", backend], capsys)
    assert f"error: serve --backend {backend}: '{broken}/" in line
    assert expected.format(config=broken / "config.json") in line


# ---------------------------------------------------------------------------------------------
# serve: an accelerator the machine lacks, images over PIL's bomb limit, a killed main process


@pytest.mark.parametrize("accelerator", ["cuda", "mps"])
def test_serving_on_an_accelerator_this_machine_lacks_is_refused_before_serving(export, capsys, accelerator):
    here = accelerators_here()
    if accelerator in here:
        pytest.skip(f"this machine has {accelerator}")
    line = serve_refuses(["--export", str(export), "--accelerator", accelerator], capsys)
    assert f"error: serve --accelerator {accelerator}: torch finds no {accelerator} device on this machine " in line
    assert f"(it has: cpu ({os.cpu_count()} cores)" in line and f"accepted here: {', '.join(['auto', *here])}" in line


def test_an_image_declaring_more_pixels_than_pils_bomb_limit_is_413_and_so_is_one_under_it(export, capsys):
    api = StudentAPI(export)  # --max_pixels 40000000, the default
    for width, height in ((10_000, 10_000), (20_000, 9_000)):  # over PIL's warning (89 Mpx), over its error (179 Mpx)
        upload = FormData([("image", UploadFile(io.BytesIO(png_declaring(width, height)), filename="bomb.png"))])
        answer = api.decode_request(upload)
        assert isinstance(answer, Rejected) and answer.status == 413, answer
        assert answer.detail.startswith("image too large: ") and f"{width * height}" in answer.detail
    line = serve_refuses(["--export", str(export), "--max_pixels", "200000000"], capsys)
    assert ("serve --max_pixels 200000000: over PIL's decompression-bomb limit of 178956970 pixels "
            "(2 x PIL.Image.MAX_IMAGE_PIXELS), which refuses larger images first; accepted: 1 to 178956970") in line


def test_killing_the_server_with_sigkill_takes_its_processes_along_and_frees_the_port(export, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "distill", "serve", "--export", str(export), "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    children: set[int] = set()
    try:
        wait_healthy(server, url, 120)
        bomb = requests.post(f"{url}/predict", files={"image": ("bomb.png", png_declaring(20_000, 9_000))}, timeout=30)
        assert bomb.status_code == 413 and "image too large" in bomb.json()["detail"], bomb.text
        children = children_of(server.pid)
        assert len(children) >= 3  # LitServe's process manager, API server and inference process
        server.send_signal(signal.SIGKILL)
        assert server.wait(timeout=10) == -signal.SIGKILL
        alive = wait_gone(children, 10)
        assert not alive, [describe(pid) for pid in alive]
        with socket.socket() as probe:  # free for the next server (which binds as uvicorn does)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    finally:
        for pid in children | {server.pid}:  # the test failed: stop what it started, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------
# report --plot: one PNG per run, none replaced unless asked


def test_report_plots_runs_whose_names_flatten_alike_to_two_pngs_and_never_replaces_them_unless_asked(
        tmp_path, capsys):
    for index, run in enumerate(("teacher/version_0", "teacher_version_0")):
        with SummaryWriter(str(tmp_path / "runs" / run)) as writer:
            for step in range(3):
                writer.add_scalar("val/acc", 0.1 * step + 0.5 * index, step)
    plots = tmp_path / "plots"
    cli_main(["report", str(tmp_path / "runs"), "--plot", str(plots)])
    written = {p.name: p.read_bytes() for p in plots.iterdir()}
    assert sorted(written) == ["teacher%2Fversion_0.png", "teacher_version_0.png"]
    assert written["teacher%2Fversion_0.png"] != written["teacher_version_0.png"]
    line = run_cli_error(["report", str(tmp_path / "runs"), "--plot", str(plots)], capsys)
    assert "exists (and 1 more); pass --overwrite to replace, or choose another --plot folder" in line
    assert {p.name: p.read_bytes() for p in plots.iterdir()} == written
