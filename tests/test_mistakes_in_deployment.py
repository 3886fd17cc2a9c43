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
- `serve --workers` over what the machine holds (one inference process a core, each within the memory
  available): one line naming the value, the bound and why, before anything starts (issue 35);
- SIGTERM while the inference processes load, or landing where Python cannot raise it: every process
  stops within seconds, with no traceback (issue 35);
- `report --plot` of runs `teacher/version_0` and `teacher_version_0`: two PNGs, and neither is replaced
  by a later call without --overwrite.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import multiprocessing
import subprocess
import sys
import time
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
from distill.common.errors import UserError
from distill.common.identity import file_digest
from distill.commands.export import export_student
from distill.commands.serve import Rejected, StudentAPI, accelerators_here, describe_export
from distill.deploy.serving_host import PROCESS_MEMORY, memory_available, workers_bound
from tests.helpers import children_of, describe, files_under, free_port, png, run_cli_error, wait_gone, wait_healthy


@pytest.fixture(scope="module")
def export(trained, tmp_path_factory) -> Path:
    """The tiny student's export (timm folder and ONNX): every test corrupts a copy of it, never it."""
    out = tmp_path_factory.mktemp("deployment") / "export"
    export_student(trained / "ckpt" / "best.ckpt", out, torchscript=False)
    return out


def kill_all(pids: set[int]) -> None:
    """SIGKILL each of `pids` that is still alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def copy_of(export: Path, folder: Path, damage: Callable[[Path], None] | None = None) -> Path:
    """A copy of the export, damaged by `damage`, its export_report.json edited to agree (so that the checks behind
    the digests are reached: a report edited by hand with the files)."""
    copy = Path(shutil.copytree(export, folder))
    if damage is not None:
        damage(copy)
        recorded_again(copy)
    return copy


def recorded_again(folder: Path) -> None:
    """export_report.json's digests rewritten for the files the folder holds now."""
    report = json.loads((folder / "export_report.json").read_text())
    report["files"] = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.name != "export_report.json"}
    (folder / "export_report.json").write_text(json.dumps(report))


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
    recorded_again(broken)
    line = serve_refuses(["--export", str(broken), "--backend", backend], capsys)
    assert f"error: serve --backend {backend}: '{broken}/" in line
    assert expected.format(config=broken / "config.json") in line


# ---------------------------------------------------------------------------------------------
# serve: an accelerator the machine lacks, images over PIL's bomb limit, a killed main process, more workers than
# the machine holds, a stop signal during start-up


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
        kill_all(children | {server.pid})  # the test failed: stop what it started, by pid


def test_more_workers_than_the_machine_holds_are_refused_in_one_line_before_anything_starts(export, capsys):
    line = serve_refuses(["--export", str(export), "--workers", "10000"], capsys)
    cores = len(os.sched_getaffinity(0))
    assert line.startswith("error: serve --workers 10000: this machine holds at most "), line
    assert f"(cores {cores}, memory " in line and " GiB available, at " in line, line
    bound = int(line.split("accepted: 1 to ")[1].split()[0])
    assert 1 <= bound <= cores
    assert not multiprocessing.active_children()  # nothing was started
    gib = 1 << 30
    assert workers_bound(cores=2, memory=22 * gib, per_process=gib) == 2  # 64 workers on 2 cores: the cores bound
    assert workers_bound(cores=64, memory=14 * gib, per_process=gib) == 14  # the memory bounds
    assert workers_bound(cores=64, memory=gib // 2, per_process=gib) == 1  # one always: the default is never refused


def spawned(pid: int) -> bool:
    """Whether `pid` is a process multiprocessing spawned (LitServe's inference processes)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_sigterm_while_the_inference_processes_load_stops_every_process_within_seconds_quietly(export, tmp_path):
    if workers_bound(len(os.sched_getaffinity(0)), memory_available(), PROCESS_MEMORY) < 2:
        pytest.skip("this machine holds one inference process (serve --workers 2 is refused)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "distill", "serve", "--export", str(export), "--port", str(port),
                               "--workers", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    children: set[int] = set()
    try:
        assert server.stdout.readline().startswith("serving "), server.stderr.read()
        deadline = time.time() + 60
        while len([pid for pid in children_of(server.pid) if spawned(pid)]) < 2:  # both started, loading torch
            assert server.poll() is None and time.time() < deadline, server.stderr.read()
            time.sleep(0.05)
        with pytest.raises(requests.ConnectionError):  # still starting: nothing answers yet
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
        children = children_of(server.pid)
        sent = time.time()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        alive = wait_gone(children, 10)
        assert not alive, [describe(pid) for pid in alive]
        assert time.time() - sent < 10
        out, err = server.communicate(timeout=10)
        assert "server stopped (SIGTERM)" in out, out
        assert "Traceback" not in err and "interrupted" not in err, err
    finally:
        kill_all(children | {server.pid})  # the test failed: stop what it started, by pid


def test_a_stop_signal_that_python_cannot_raise_where_it_lands_still_stops_everything_at_once():
    script = (  # SIGTERM's KeyboardInterrupt raised in an at-fork hook (in its sleep), where Python only reports it
        "import multiprocessing, os, signal, time\n"
        "from distill.deploy.serving_host import StopOnSignal\n"
        "with StopOnSignal(grace=60):\n"
        "    os.register_at_fork(after_in_parent=lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1)))\n"
        "    multiprocessing.get_context('fork').Process(target=time.sleep, args=(60,)).start()\n"
        "    time.sleep(60)\n")
    # returns once no process holds its output: the child it forked is gone too, long before the grace or the sleeps
    stopped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=40)
    assert stopped.returncode == 0 and "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stdout.startswith("server stopped (SIGTERM"), stopped.stdout


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


# ---------------------------------------------------------------------------------------------
# What predict, serve and a teacher read is what export wrote (export_report.json's digests)


def another_checkpoints_onnx(export: Path, trained: Path, tmp_path: Path) -> Callable[[Path], None]:
    """A damage: model.onnx replaced by the model.onnx of an export of another checkpoint."""
    other = tmp_path / "other_export"
    export_student(trained / "ckpt" / "last.ckpt", other, torchscript=False)
    assert file_digest(other / "model.onnx") != file_digest(export / "model.onnx")
    return lambda folder: shutil.copy(other / "model.onnx", folder / "model.onnx")


def a_stray_int8_model(folder: Path) -> None:
    shutil.copy(folder / "model.onnx", folder / "model.int8.onnx")


@pytest.mark.parametrize("case", ["config_edited", "onnx_of_another_checkpoint", "int8_never_exported",
                                  "no_report", "teacher_folder_edited"])
def test_a_file_of_an_export_edited_replaced_or_added_by_hand_is_refused_where_it_is_read(export, trained, tmp_path,
                                                                                        capsys, case):
    edit_mean = config_edit(lambda c: c["pretrained_cfg"].update(mean=[0.1, 0.1, 0.1]))
    damage, command, named, why = {
        "config_edited": (edit_mean, ["predict"], "config.json", "changed since it was written"),
        "onnx_of_another_checkpoint": (another_checkpoints_onnx(export, trained, tmp_path), ["serve", "onnx"],
                                       "model.onnx", "changed since it was written"),
        "int8_never_exported": (a_stray_int8_model, ["serve", "int8"], "model.int8.onnx", "was not written with the rest"),
        "no_report": (lambda folder: (folder / "export_report.json").unlink(), ["predict"], "export_report.json",
                      "is missing"),
        "teacher_folder_edited": (edit_mean, ["teacher"], "config.json", "changed since it was written"),
    }[case]
    folder = Path(shutil.copytree(export, tmp_path / "edited"))
    damage(folder)
    out = tmp_path / "predictions.csv"
    if command[0] == "predict":
        line = run_cli_error(["predict", "--export", str(folder), "--images", str(trained / "images" / "val"),
                              "--out", str(out)], capsys)
        assert line.startswith(f"error: --export: '{folder / named}' {why}")
    elif command[0] == "serve":
        line = serve_refuses(["--export", str(folder), "--backend", command[1]], capsys)
        assert line.startswith(f"error: serve --backend {command[1]}: '{folder / named}' {why}")
    else:  # an export folder as the teacher of another run
        from teachers import Teacher
        with pytest.raises(UserError) as refused:
            Teacher("deit_tiny_distilled_patch16_224", weights=str(folder))
        line = str(refused.value)
        assert line.startswith(f"teacher.weights: '{folder / named}' {why}")
    assert "again" in line  # what to do: export again
    assert not out.exists() and not list(tmp_path.glob(".predictions*"))


def test_each_backend_reports_the_version_of_the_file_it_serves_and_exported_files_are_readable_by_all(export):
    versions = {backend: describe_export(export, backend)["version"] for backend in ("torch", "onnx")}
    assert versions == {"torch": file_digest(export / "model.safetensors")[7:19],
                        "onnx": file_digest(export / "model.onnx")[7:19]}
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()} == {p.name: 0o666 & ~mask
                                                                           for p in export.iterdir()}


# ---------------------------------------------------------------------------------------------
# A full disk or a read-only folder: one line naming the path and the cause, nothing left behind


@pytest.mark.parametrize("command", ["export", "predict"])
@pytest.mark.parametrize("where", ["read_only_folder", "full_disk"])
def test_export_and_predict_onto_a_full_disk_or_into_a_read_only_folder_are_one_line_and_leave_nothing(
        export, trained, tmp_path, capsys, request, command, where):
    folder = request.getfixturevalue(where)
    before = files_under(folder)
    out = folder / "new" / ("export" if command == "export" else "predictions.csv")
    args = (["export", "--ckpt", str(trained / "ckpt" / "best.ckpt"), "--out", str(out)] if command == "export" else
            ["predict", "--export", str(export), "--images", str(trained / "images" / "val"), "--out", str(out)])
    line = run_cli_error(args, capsys)
    cause = "Read-only file system" if where == "read_only_folder" and os.geteuid() == 0 else (
        "Permission denied" if where == "read_only_folder" else "No space left on device")
    assert line.startswith(f"error: {command}") and cause in line and str(folder) in line, line
    assert ("write elsewhere" if where == "read_only_folder" else "free disk space") in line
    assert files_under(folder) == before and not (folder / "new").exists()  # no lock, no partial file, no folder


def test_a_stop_signal_while_a_process_gets_its_start_up_data_is_sent_again_after_it(monkeypatch):
    """A SIGTERM raised inside multiprocessing's hand-over of a spawned process's start-up data would cut it, and the
    process would print `EOFError: Ran out of input` with a traceback: the handler defers it by re-sending it."""
    import inspect
    from types import SimpleNamespace

    from distill.deploy import serving_host

    handing_over = {}
    exec(compile("import inspect\nframe = inspect.currentframe()", "/usr/lib/python3/multiprocessing/popen_spawn_posix.py",
                 "exec"), handing_over)
    assert serving_host._starting_a_process(handing_over["frame"])
    assert not serving_host._starting_a_process(inspect.currentframe())
    sent = []
    monkeypatch.setattr(serving_host.threading, "Timer", lambda delay, send, args: SimpleNamespace(
        start=lambda: sent.append((delay, send, args))))
    stop = serving_host.StopOnSignal()
    stop.main = os.getpid()
    stop._handle(signal.SIGTERM, handing_over["frame"])  # no KeyboardInterrupt here
    assert stop.signum is None and sent == [(0.05, os.kill, (os.getpid(), signal.SIGTERM))]
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGTERM, inspect.currentframe())  # re-sent, outside the hand-over: the stop goes on
    assert stop.stopped_by == "SIGTERM"
