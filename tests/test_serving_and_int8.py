"""`distill serve` over HTTP with a real client, and `distill export --int8`."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.datasets import load_digits
from starlette.datastructures import FormData, UploadFile

import distill.deploy.quantize
from distill.common.errors import UserError
from distill.common.files import OutputLock
from distill.common.identity import file_digest
from distill.commands.export import Int8, export_student
from distill.deploy.inference import INT8_FILE
from distill.commands.predict import predict_folder
from distill.commands.serve import StudentAPI, make_server
from tests.helpers import children_of, describe, free_port, png, run_cli_error, wait_gone, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(trained, tmp_path_factory) -> Path:
    """The tiny student's export with an INT8 model (dynamic quantization, the default)."""
    out = tmp_path_factory.mktemp("serve") / "export"
    export_student(trained / "ckpt" / "best.ckpt", out, torchscript=False, int8=Int8())  # dynamic: the default
    return out


def test_the_server_answers_as_predict_does_rejects_bad_input_and_stops_cleanly(trained, export, tmp_path):
    val = trained / "images" / "val"
    good = sorted(val.rglob("*.png"))[::4]  # 12 images of the 3 classes
    deep = Image.fromarray((np.asarray(Image.open(good[0]).convert("L")).astype(np.uint16) * 257), mode="I;16")
    (tmp_path / "images").mkdir()
    deep.save(tmp_path / "images" / "deep16.png")  # 16-bit greyscale: converted by its range, as predict does
    scan = load_digits().images[-1] * 16  # a real digit scan (8x8, 0..256): resized by the export's preprocessing
    Image.fromarray(scan.clip(0, 255).astype(np.uint8)).save(tmp_path / "images" / "digit.png")
    for path in good:
        (tmp_path / "images" / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    predict_folder(export, tmp_path / "images", tmp_path / "pred.csv", top_k=3)
    expected = {Path(row["path"]).name: row for row in csv.DictReader((tmp_path / "pred.csv").open())}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "distill", "serve", "--export", str(export), "--port", str(port), "--top_k", "3",
         "--max_pixels", "10000", "--max_body_mb", "0.25", "--batch_timeout", "0.2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(server, url, 180)
        info = requests.get(f"{url}/info", timeout=10).json()
        assert len(info["version"]) == 12  # the weights' SHA-256, shortened
        assert info["classes"] == ["cat", "dog", "fox"] and info["input_size"] == [3, 32, 32]

        def ask(name: str, data: bytes) -> requests.Response:
            return requests.post(f"{url}/predict", files={"image": (name, data, "image/png")}, timeout=60)

        def same_as_predict(response: requests.Response, name: str) -> None:
            assert response.status_code == 200, response.text
            answer, row = response.json(), expected[name]
            assert (answer["model"], answer["version"]) == (info["model"], info["version"])
            assert [p["label"] for p in answer["predictions"]] == [row["class_1"], row["class_2"], row["class_3"]]
            probs = [p["probability"] for p in answer["predictions"]]
            assert np.allclose(probs, [float(row[f"prob_{i}"]) for i in (1, 2, 3)], atol=1e-5)

        files = sorted((tmp_path / "images").iterdir())
        bad = {"not_an_image.png": b"hello, this is text", "truncated.png": files[1].read_bytes()[:200]}
        uploads = [(f.name, f.read_bytes()) for f in files] + list(bad.items())
        with ThreadPoolExecutor(len(uploads)) as pool:  # together: dynamic batches mixing good and bad requests
            answers = dict(zip([name for name, _ in uploads], pool.map(lambda u: ask(*u), uploads)))
        for path in files:
            same_as_predict(answers[path.name], path.name)
        not_an_image = answers["not_an_image.png"]
        assert not_an_image.status_code == 400 and "not a readable image" in not_an_image.text
        assert answers["truncated.png"].status_code == 400 and "truncated" in answers["truncated.png"].text

        def post(**request) -> requests.Response:
            return requests.post(f"{url}/predict", timeout=30, **request)

        first, second = files[0].read_bytes(), files[1].read_bytes()
        big = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)))
        hostile = {  # what -> (the request, the status it must get)
            "a text field, no file": (lambda: post(files={"image": (None, "x")}), 400),
            "a form, not multipart": (lambda: post(data={"image": "x"}), 415),
            "another field name": (lambda: post(files={"photo": ("a.png", first)}), 400),
            "raw bytes, not multipart": (lambda: post(data=first, headers={"Content-Type": "image/png"}), 415),
            "JSON": (lambda: post(json={"image": "aGVsbG8="}), 415),
            "two images": (lambda: post(files=[("image", ("a.png", first)), ("image", ("b.png", second))]), 400),
            "multipart without a boundary": (lambda: post(data=first, headers={"Content-Type": "multipart/form-data"}),
                                             400),
            "multipart of garbage": (lambda: post(data=b"\x00garbage" * 50,
                                                  headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400),
            "over the pixel limit": (lambda: ask("bomb.png", png(Image.new("L", (200, 200)))), 413),
            "over the body limit": (lambda: ask("big.png", big), 413),
        }
        for what, (send, status) in hostile.items():
            response = send()
            assert response.status_code == status, (what, response.status_code, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail, (what, detail)
            same_as_predict(ask(files[0].name, first), files[0].name)  # and the server goes on
        prepared = requests.Request("POST", f"{url}/predict", files={"image": ("a.png", first)}).prepare()
        boundary = prepared.headers["Content-Type"].split("boundary=")[1]
        shouted = post(data=prepared.body, headers={"Content-Type": f"MULTIPART/FORM-DATA; boundary={boundary}"})
        same_as_predict(shouted, files[0].name)  # MULTIPART/FORM-DATA is the same media type
        traversal = ask("../../../escaped.png", first)  # a file name is never used as a path
        same_as_predict(traversal, files[0].name)
        assert not any(tmp_path.parent.rglob("escaped.png"))

        bench = subprocess.run(  # benchmarks/serve_speed.py against this server, and the INT8 model alone
            [sys.executable, "benchmarks/serve_speed.py", f"--url={url}", f"--export={export}", "--backends", "int8",
             "--clients", "2", "--requests", "4", "--repeats", "1", "--threads", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert bench.returncode == 0, bench.stderr[-3000:]
        rows = [line.split("|")[1:-1] for line in bench.stdout.splitlines() if line.startswith("| torch | as started")]
        assert len(rows) == 1 and float(rows[0][3]) > 0 and float(rows[0][4]) > 0  # req/s, p50 ms
        alone = [line for line in bench.stdout.splitlines() if line.startswith("| ONNX Runtime INT8 |")]
        assert len(alone) == 1 and float(alone[0].split("|")[3].replace(",", "")) > 0

        workers = children_of(server.pid)
        assert workers  # LitServe's API server and inference processes
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        out = server.stdout.read()
        assert "server stopped" in out and "Traceback" not in out, out
        assert not wait_gone(workers, 10), [describe(pid) for pid in wait_gone(workers, 0)]
        with socket.socket() as probe:  # the port is free again for the next server (which binds as uvicorn does)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    finally:
        if server.poll() is None:  # the test failed while it ran: its API server and inference processes too
            os.killpg(server.pid, signal.SIGKILL)


def test_info_is_the_model_as_one_flat_object_with_the_keys_of_an_answer(export):
    client = TestClient(make_server(export, backend="int8").app)  # no lifespan: no inference process starts
    info = client.get("/info").json()
    assert set(info) == {"model", "version", "backend", "classes", "input_size"}
    assert info["model"] == json.loads((export / "config.json").read_text())["architecture"]
    assert info["backend"] == "int8" and len(info["version"]) == 12  # the served file's SHA-256, shortened
    assert info["classes"] == ["cat", "dog", "fox"] and info["input_size"] == [3, 32, 32]
    assert client.get("/info/litserve").json()["model"] == info  # LitServe's own page, moved beside it


def test_int8_export_keeps_top1_within_budget_and_serves_the_same_classes(trained, export):
    report = json.loads((export / "export_report.json").read_text())["formats"]["int8"]
    assert report["ok"] and report["drop_points"] <= 0.5
    assert report["method"] == "dynamic" and report["calibration_images"] == 0  # nothing to calibrate
    assert report["validation_images"] == 48
    assert (export / INT8_FILE).stat().st_size < (export / "model.onnx").stat().st_size / 2

    images = sorted((trained / "images" / "val").rglob("*.png"))
    top1 = {}
    for backend in ("torch", "int8"):
        api = StudentAPI(export, backend, top_k=1)
        api.setup("cpu")
        inputs = [api.decode_request(FormData([("image", UploadFile(io.BytesIO(p.read_bytes()), filename=p.name))]))
                  for p in images]
        top1[backend] = [answer[0]["label"] for answer in api.predict(inputs)]
    agree = np.mean([a == b for a, b in zip(top1["torch"], top1["int8"])])
    assert agree >= 0.95, agree


def test_int8_over_its_accuracy_budget_is_refused_and_nothing_is_written(trained, tmp_path, monkeypatch):
    scores = iter([0.9, 0.8])  # fp32 ONNX, then INT8: a 10-point drop
    monkeypatch.setattr(distill.deploy.quantize, "onnx_top1", lambda path, dataset: next(scores))
    with pytest.raises(UserError, match=r"drops 10.00 points \(90.00% fp32 -> 80.00% INT8\) > --int8_max_drop 0.5"):
        export_student(trained / "ckpt" / "best.ckpt", tmp_path / "export", torchscript=False, int8=Int8(8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--backend", "int8"], "has no model.int8.onnx; write it with distill export --int8"),
    (["--port", "80"], "--port: 80 is out of range (accepted: >= 1024 and <= 65535)"),
    (["--host", "example.com"], "--host: example.com is not one of '127.0.0.1', '0.0.0.0', '::'"),
    (["--max_batch_size", "0"], "--max_batch_size: 0 is out of range (accepted: > 0)"),
])
def test_serve_mistakes_are_one_line(trained, tmp_path, capsys, args, message):
    out = tmp_path / "export"
    export_student(trained / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False)
    assert message in run_cli_error(["serve", "--export", str(out), *args], capsys)


def test_a_damaged_onnx_model_or_a_port_another_server_holds_is_one_line(export, tmp_path, capsys):
    damaged = Path(shutil.copytree(export, tmp_path / "damaged"))
    (damaged / "model.onnx").write_bytes((export / "model.onnx").read_bytes()[:5000])
    message = run_cli_error(["serve", "--export", str(damaged), "--backend", "onnx"], capsys)
    assert f"serve --backend onnx: '{damaged / 'model.onnx'}' changed since it was written" in message
    report = json.loads((damaged / "export_report.json").read_text())  # a report edited to agree: the model is
    report["files"]["model.onnx"] = file_digest(damaged / "model.onnx")  # still loaded, and refused, whole
    (damaged / "export_report.json").write_text(json.dumps(report))
    message = run_cli_error(["serve", "--export", str(damaged), "--backend", "onnx"], capsys)
    assert f"serve --backend onnx: '{damaged / 'model.onnx'}' could not be loaded" in message
    port = free_port()  # a server still loading its model holds the port's lock before it binds the port
    with OutputLock(Path(tempfile.gettempdir()) / f"distill-serve-port-{port}.lock", "a server"):
        message = run_cli_error(["serve", "--export", str(export), "--port", str(port)], capsys)
    assert f"serve --port {port}: another distill serve is starting or serving on port {port}" in message


def test_a_port_in_use_is_named_before_anything_starts(trained, tmp_path, capsys):
    out = tmp_path / "export"
    export_student(trained / "ckpt" / "best.ckpt", out, onnx=False, torchscript=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = run_cli_error(["serve", "--export", str(out), "--port", str(port)], capsys)
    assert f"serve --port {port}: cannot listen on 127.0.0.1:{port}" in message


def test_int8_needs_onnx_and_the_training_data(trained, tmp_path, capsys):
    ckpt = str(trained / "ckpt" / "best.ckpt")
    message = run_cli_error(["export", "--ckpt", ckpt, "--out", str(tmp_path / "a"), "--int8", "--no-onnx"], capsys)
    assert "export --int8 quantizes the ONNX model: drop --no-onnx" in message
    message = run_cli_error(["export", "--ckpt", ckpt, "--out", str(tmp_path / "b"), "--int8", "--data",
                             str(tmp_path / "moved")], capsys)
    assert f"export --data: the training data, '{tmp_path / 'moved'}', is not a folder here" in message
    assert "pass --data DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_serve_without_its_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "litserve", None)  # as if `pip install deit-distill` without [serve]
    monkeypatch.delitem(sys.modules, "distill.commands.serve")
    message = run_cli_error(["serve", "--export", "exports/student"], capsys)
    assert "distill serve needs LitServe and python-multipart: pip install 'deit-distill[serve]'" in message
