"""Serving speed: a bounded load test of `distill serve` on loopback, and the model alone per backend.

    python benchmarks/serve_speed.py --export runs/digits/export        # about 3 minutes here
    python benchmarks/serve_speed.py --export DIR --backends int8 --clients 1 32 --requests 400
    python benchmarks/serve_speed.py --url http://127.0.0.1:8000 --clients 8   # a server already running

Part 1, the server: for each backend (torch, onnx, int8) with dynamic batching on
(--max_batch_size 16, --batch_timeout 0.005) and off (--max_batch_size 1), one `distill serve`
is started on a free loopback port, warmed up, and sent `--requests` uploads of the same PNG at
each concurrency of `--clients` (each client a thread with its own HTTP session, sending its
next request when the previous one is answered); then it is stopped. Throughput is requests
answered per second of wall time; latency is each request's round trip, p50 and p99 (`--url`:
the same against a server already running, as it was started, and no server is started). The
clients run on the same machine as the server and take CPU from it: on a 2-core machine the
absolute figures are a floor, the comparisons between rows are the point. Every answer must
be a 200 with the same top-1 class, or the run fails.

Part 2, the model alone: the same preprocessed batch through PyTorch (the timm model), ONNX
Runtime fp32 (model.onnx) and ONNX Runtime INT8 (model.int8.onnx), in one process with the
same thread count, batches 1 and 64, median of `--repeats` timed runs each; images/s and
the ratio to ONNX fp32.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import requests
import torch
from PIL import Image

from distill.deploy.inference import INT8_FILE
from distill.deploy.inference import load_export

FILES = {"torch": "model.safetensors", "onnx": "model.onnx", "int8": INT8_FILE}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(export: Path, backend: str, batch: int, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "distill", "serve", "--export", str(export), "--backend", backend, "--port", str(port),
         "--max_batch_size", str(batch)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True)  # its own process group: stop() can take its API server and workers down with it
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve --backend {backend} exited: {server.stdout.read()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).text == "ok":
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit(f"serve --backend {backend} did not come up in 180 s")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def load(url: str, image: bytes, clients: int, total: int) -> tuple[float, list[float], set[str]]:
    """`total` requests from `clients` threads; returns (requests/s, latencies in s, top-1 labels seen)."""
    latencies: list[float] = []
    labels: set[str] = set()
    lock, remaining = threading.Lock(), [total]
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                began = time.perf_counter()
                response = session.post(url, files={"image": ("bench.png", image, "image/png")}, timeout=120)
                took = time.perf_counter() - began
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code} {response.text[:200]}")
                        return
                    latencies.append(took)
                    labels.add(response.json()["predictions"][0]["label"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise SystemExit(f"load test: a request failed: {errors[0]}")
    return len(latencies) / wall, latencies, labels


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def model_speed(export: Path, backends: list[str], repeats: int, threads: int) -> list[str]:
    """Part 2: images/s of the model alone per backend, batches 1 and 64, in this process."""
    import onnxruntime as ort

    torch.set_num_threads(threads)
    model = load_export(export)
    size = model.pretrained_cfg["input_size"]
    batch = torch.randn(64, *size, generator=torch.Generator().manual_seed(0))
    runs = {}
    if "torch" in backends:
        runs["PyTorch (timm model)"] = lambda x: model(torch.from_numpy(x))
    for backend, label in (("onnx", "ONNX Runtime fp32"), ("int8", "ONNX Runtime INT8")):
        if backend in backends:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(export / FILES[backend]), options, providers=["CPUExecutionProvider"])
            runs[label] = lambda x, session=session: session.run(None, {"images": x})
    speeds: dict[str, dict[int, float]] = {}
    for size_ in (1, 64):
        x = batch[:size_].numpy()
        for label, run in runs.items():
            with torch.inference_mode():
                run(x)
                run(x)
                times = []
                for _ in range(repeats):
                    count = max(1, 256 // size_)
                    began = time.perf_counter()
                    for _ in range(count):
                        run(x)
                    times.append((time.perf_counter() - began) / (count * size_))
            speeds.setdefault(label, {})[size_] = 1.0 / statistics.median(times)
    reference = speeds.get("ONNX Runtime fp32")
    lines = ["| model alone | batch 1 img/s | batch 64 img/s | x ONNX fp32 (64) |", "|---|---|---|---|"]
    for label, row in speeds.items():
        ratio = f"{row[64] / reference[64]:.2f}" if reference else "-"
        lines.append(f"| {label} | {row[1]:,.0f} | {row[64]:,.0f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=None, help="export folder (with model.onnx, model.int8.onnx)")
    parser.add_argument("--url", default=None, help="load-test this running server instead of starting servers")
    parser.add_argument("--backends", nargs="+", choices=list(FILES), default=list(FILES))
    parser.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="requests per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model-alone figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of part 2")
    parser.add_argument("--image", type=Path, default=None, help="PNG/JPEG to send (default: random, model size)")
    args = parser.parse_args()
    if args.export is None and args.url is None:
        parser.error("give --export DIR (servers are started on it), --url URL (a running server), or both")
    missing = [b for b in args.backends if args.export and not (args.export / FILES[b]).is_file()]
    if missing:
        raise SystemExit(f"{args.export} has no {', '.join(FILES[b] for b in missing)} "
                         "(distill export --int8 writes all three)")
    if args.image:
        image = args.image.read_bytes()
    else:
        side = (requests.get(f"{args.url}/info", timeout=30).json()["input_size"] if args.url else
                load_export(args.export).pretrained_cfg["input_size"])[-1]
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        image = buffer.getvalue()
    print(f"# serve_speed: {args.url or args.export}, {args.requests} requests a row, {os.cpu_count()} CPU cores "
          f"(clients and server share them), torch {torch.__version__}", flush=True)
    print("| backend | dynamic batching | clients | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|", flush=True)
    if args.url:
        backend = requests.get(f"{args.url}/info", timeout=30).json()["backend"]
        load_rows(f"{args.url}/predict", image, args, backend, "as started")
    else:
        for backend in args.backends:
            for batching in args.batching:
                port = free_port()
                server = start(args.export, backend, 16 if batching == "on" else 1, port)
                try:
                    load_rows(f"http://127.0.0.1:{port}/predict", image, args, backend, batching)
                finally:
                    stop(server)
    if args.export:
        print()
        print("\n".join(model_speed(args.export, args.backends, args.repeats, args.threads)))


def load_rows(url: str, image: bytes, args: argparse.Namespace, backend: str, batching: str) -> None:
    """Part 1's rows for one server: a warm-up, then each concurrency of --clients."""
    load(url, image, 4, 20)
    labels: set[str] = set()
    for clients in args.clients:
        rate, latencies, seen = load(url, image, clients, args.requests)
        labels |= seen
        print(f"| {backend} | {batching} | {clients} | {rate:,.0f} | {1000 * percentile(latencies, 50):.1f} "
              f"| {1000 * percentile(latencies, 99):.1f} |", flush=True)
    if len(labels) != 1:
        raise SystemExit(f"{backend}: the same image got different top-1 classes {sorted(labels)}")


if __name__ == "__main__":
    main()
