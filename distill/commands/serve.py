"""Serve an exported student over HTTP, on LitServe: dynamic batching, top-k JSON, a 4xx for bad input.

    distill serve --export exports/student [--port 8000] [--backend torch|onnx|int8]
    curl -F image=@digit.png http://127.0.0.1:8000/predict

A request is a multipart/form-data upload with one file field named `image` (what `curl -F`,
`requests.post(files=...)` and HTML forms send); the answer is JSON: the model's name, its
version (the first 12 hex digits of the SHA-256 of its weights file), the backend and the
top-k classes with their probabilities, best first. Only the export folder is needed: the
preprocessing is the one `distill predict` applies (`distill.deploy.inference.export_transform`, from
the export's config.json), so the two can never disagree. Images are read as training reads
them (`distill.data.images.load_image`: 16-bit, float and transparent images converted by their
range, EXIF orientation applied).

Bad input is answered with a 4xx and a one-line `{"detail": ...}`, and the server goes on
serving: a body that is not multipart/form-data (415), a body over --max_body_mb (413), no
`image` file field (400), bytes that are not a readable image or a truncated one (400), an
image whose header declares more than --max_pixels pixels (413, refused before decoding: a
decompression bomb never reaches memory; so is one over PIL's own decompression-bomb limit,
which --max_pixels may not exceed). A request that is rejected never fails the others
batched with it. Nothing a request sends is used as a path. The server binds to loopback
unless --host says otherwise; GET /health answers "ok" once the model is loaded, GET /info
gives the model as one flat JSON object: `model` (its name), `version`, `backend`, `classes` and
`input_size`, the keys of every answer (LitServe's own page, with the server's settings, is at
GET /info/litserve).

Everything is checked before "serving ..." is printed: the export folder whole
(`distill.deploy.inference.load_export`; an ONNX / INT8 model's input and output shapes against its
config.json), an --accelerator this machine has, --workers within what it holds (one inference
process a core, each within the memory available: `distill.deploy.serving_host.workers_bound`), the
port. Every process LitServe starts (its process manager, API servers and inference processes) is
killed by the kernel when the `distill serve` process ends, however it ends (SIGKILL, the OOM
killer): none is left holding the port or the model. SIGTERM or Ctrl+C at any moment, start-up
included, stops them all within seconds, without a traceback (`serving_host.StopOnSignal`).
"""
from __future__ import annotations

import io
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from PIL import Image

from distill.common.commandline import call, command
from distill.common.errors import UserError, first_line
from distill.common.ranges import PositiveFloat, PositiveInt
from distill.data.images import TooManyPixels, UnreadableImage, load_image
from distill.deploy.inference import (
    CONFIG,
    INT8_FILE,
    EXPORT_AGAIN,
    best_classes,
    export_transform,
    label_names,
    load_export,
    read_config,
    verify_export,
)
from distill.deploy.serving_host import (
    PROCESS_MEMORY,
    ForkedChildrenDieWithParent,
    StopOnSignal,
    accelerators_here,
    ctrl_c_blocked,
    die_with_parent,
    exit_quietly,
    listen,
    memory_available,
    workers_bound,
)

try:  # the `serve` extra; python-multipart parses the uploads (without it every upload would be a 500)
    import litserve as ls
    import python_multipart  # noqa: F401
    from starlette.datastructures import UploadFile
    from starlette.responses import JSONResponse

    from distill.deploy.request_gate import FIELD, RequestGate
except ImportError as err:
    raise UserError(f"distill serve needs LitServe and python-multipart: pip install 'deit-distill[serve]' "
                    f"({err})") from err

__all__ = ["StudentAPI", "RequestGate", "make_server", "main", "onnx_session", "accelerators_here", "die_with_parent"]

BACKENDS = {"torch": "model.safetensors", "onnx": "model.onnx", "int8": INT8_FILE}


@dataclass
class Rejected:
    """A request answered with a 4xx instead of a prediction (kept in the batch, so the others go on)."""

    status: int
    detail: str


class StudentAPI(ls.LitAPI):
    """The exported student behind LitServe: decode one upload, predict a batch, encode top-k JSON.

    Decoding never raises: a bad upload becomes a `Rejected` that passes through the batch, so
    one hostile request cannot fail the requests batched with it (LitServe answers a whole
    batch with the error when one of its steps raises).
    """

    def __init__(self, export: str | Path, backend: str = "torch", top_k: int = 5, max_pixels: int = 40_000_000,
                 threads: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.export, self.backend, self.top_k, self.max_pixels = Path(export), backend, top_k, max_pixels
        self.threads = threads
        self.parent = os.getpid()  # the process LitServe starts the inference processes from
        self.metadata = describe_export(self.export, backend)  # checked here, before any worker starts

    def setup(self, device: str) -> None:
        if os.getpid() != self.parent:  # an inference process (spawned): it must not outlive the server
            die_with_parent(self.parent)
            # stopped by the main process (SIGTERM) at any moment, loading included: it ends at once, with no traceback;
            # Ctrl+C reaches every process of the terminal's group: the main process stops this one in order, a
            # KeyboardInterrupt here would print a traceback of LitServe's loop instead
            signal.signal(signal.SIGTERM, exit_quietly)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_export(self.export)
        served = verify_export(self.export, (BACKENDS[self.backend],))[BACKENDS[self.backend]]
        if served.removeprefix("sha256:")[:12] != self.metadata["version"]:  # replaced since the server checked it
            raise UserError(f"serve: '{self.export / BACKENDS[self.backend]}' changed after the server started")
        self.names, self.transform = label_names(model), export_transform(model)
        self.device = torch.device(device)
        if self.backend == "torch":
            self.model = model.to(self.device)
            self.run: Callable[[torch.Tensor], torch.Tensor] = self._run_torch
        else:
            self.session = onnx_session(self.export / BACKENDS[self.backend], model, self.threads)
            self.run = self._run_onnx

    def _run_torch(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(images.to(self.device)).cpu()

    def _run_onnx(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": images.numpy()})[0])

    def decode_request(self, request, **kwargs: Any) -> torch.Tensor | Rejected:  # LitServe reads the
        # annotation of `request` as the route's body type: none means the raw request (form or JSON)
        uploads = request.getlist(FIELD) if hasattr(request, "getlist") else []
        if len(uploads) > 1:
            return Rejected(400, f"{len(uploads)} '{FIELD}' fields; send one image per request")
        upload = uploads[0] if uploads else None
        if not isinstance(upload, UploadFile):
            return Rejected(400, f"expected a multipart/form-data upload with a file field '{FIELD}' "
                                 f"(curl -F {FIELD}=@picture.png URL)")
        try:
            upload.file.seek(0)
            image = load_image(io.BytesIO(upload.file.read()), max_pixels=self.max_pixels)
        except TooManyPixels as err:
            return Rejected(413, f"image too large: {err}")
        except UnreadableImage as err:
            if isinstance(err.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
                # PIL refused the header's size before the check above could (over 2x PIL.Image.MAX_IMAGE_PIXELS)
                return Rejected(413, f"image too large: {err.__cause__}; this server accepts at most "
                                     f"{self.max_pixels} pixels")
            return Rejected(400, f"not a readable image: {err}")
        return self.transform(image)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs  # stacked in predict, around the rejected ones

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def predict(self, inputs: Any, **kwargs: Any) -> Any:
        batched = isinstance(inputs, list)
        inputs = inputs if batched else [inputs]
        images = [x for x in inputs if isinstance(x, torch.Tensor)]
        answers: list[Any] = []
        if images:
            probs, indices = best_classes(self.run(torch.stack(images)), self.top_k)
            answers = [[{"label": self.names[i], "probability": p} for p, i in zip(p_row, i_row)]
                       for p_row, i_row in zip(probs, indices)]
        found = iter(answers)
        outputs = [x if isinstance(x, Rejected) else next(found) for x in inputs]
        return outputs if batched else outputs[0]

    def encode_response(self, output: Any, **kwargs: Any):  # a return annotation would be the
        # route's response model: none lets a JSONResponse (a rejection) through as it is
        if isinstance(output, Rejected):
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        return {"model": self.metadata["model"], "version": self.metadata["version"], "backend": self.backend,
                "predictions": output}


def describe_export(export: Path, backend: str) -> dict[str, Any]:
    """Name, version, classes and input size of an export folder; a UserError if it cannot serve `backend`.

    The version is the first 12 hex digits of the sha256 of the file `backend` serves (model.safetensors,
    model.onnx or model.int8.onnx), verified against export_report.json: two backends of one export report
    different versions because they run different files."""
    model = load_export(export, "serve --export")
    served = export / BACKENDS[backend]
    if not served.is_file():
        how = {"onnx": "distill export (with --onnx, the default)", "int8": "distill export --int8"}[backend]
        raise UserError(f"serve --backend {backend}: '{export}' has no {served.name}; write it with {how}")
    digest = verify_export(export, (served.name,), f"serve --backend {backend}")[served.name]
    if backend != "torch":
        onnx_session(served, model)
    config = read_config(export)
    return {"model": config.get("architecture", type(model).__name__), "version": digest.removeprefix("sha256:")[:12],
            "backend": backend, "classes": label_names(model), "input_size": list(model.pretrained_cfg["input_size"])}


def onnx_session(path: Path, model: torch.nn.Module, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime session (CPU) of an export's `model.onnx` / `model.int8.onnx`, checked against the export's
    config.json (`model`, from `load_export`): one input `images` of [batch, *input_size], [batch, num_classes]
    out. A file that does not load or does not agree is a UserError naming it, the field and both values."""
    import onnxruntime as ort  # only for --backend onnx / int8

    option = f"serve --backend {'int8' if path.name == INT8_FILE else 'onnx'}"
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - a damaged model file fails inside ONNX Runtime in many ways
        raise UserError(f"{option}: '{path}' could not be loaded ({first_line(err, typed=True)}); "
                        f"{EXPORT_AGAIN}") from err
    config = path.parent / CONFIG
    size, classes = list(model.pretrained_cfg["input_size"]), model.num_classes
    inputs = [(i.name, list(i.shape)) for i in session.get_inputs()]
    if len(inputs) != 1 or inputs[0][0] != "images" or not _fits(inputs[0][1], size):
        shown = ", ".join(f"'{name}' {shape}" for name, shape in inputs)
        raise UserError(f"{option}: '{path}' takes {shown}, but '{config}' input_size is {size} (expected one input "
                        f"'images' of [batch, {', '.join(map(str, size))}]); {EXPORT_AGAIN}")
    outputs = [list(o.shape) for o in session.get_outputs()]
    if not outputs or not _fits(outputs[0], [classes]):
        raise UserError(f"{option}: '{path}' gives {outputs[0] if outputs else 'no output'}, but '{config}' "
                        f"num_classes is {classes} (expected [batch, {classes}]); {EXPORT_AGAIN}")
    return session


def _fits(shape: list[Any], size: list[int]) -> bool:
    """An ONNX shape (dimensions as numbers, or names where dynamic) is [batch, *size]."""
    return len(shape) == len(size) + 1 and all(not isinstance(d, int) or d == s for d, s in zip(shape[1:], size))


def make_server(export: str | Path, backend: Literal["torch", "onnx", "int8"] = "torch", max_batch_size: PositiveInt = 16,
                batch_timeout: PositiveFloat = 0.005, workers: PositiveInt = 1, top_k: PositiveInt = 5,
                max_pixels: PositiveInt = 40_000_000, max_body_mb: PositiveFloat = 16.0,
                accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto", timeout: PositiveFloat = 30.0) -> ls.LitServer:
    """The LitServer for an export folder (not started: call `.run(host=..., port=...)`).

    Args:
        export: folder written by `distill export`
        backend: torch (the timm model), onnx (model.onnx) or int8 (model.int8.onnx, ONNX Runtime)
        max_batch_size: largest dynamic batch (1: no batching, each request alone)
        batch_timeout: seconds a batch waits to fill before it runs
        workers: inference processes (each holds the model); at most one a core (the CPUs this process may use)
            and as many as the memory available holds at the weights' size + 0.75 GiB each (torch and the API
            server LitServe starts with each), checked before anything starts
        top_k: classes per answer
        max_pixels: largest image accepted, in pixels (checked from its header, before decoding)
        max_body_mb: largest request body, in MiB
        accelerator: where the torch backend runs (auto: a CUDA GPU when there is one; cuda and mps only where
            torch finds one)
        timeout: seconds a request may wait for its answer before LitServe answers it with a timeout error
    """
    if accelerator == "auto":
        accelerator = "cuda" if backend == "torch" and torch.cuda.is_available() else "cpu"
    here = accelerators_here()
    if accelerator not in here:
        raise UserError(f"serve --accelerator {accelerator}: torch finds no {accelerator} device on this machine "
                        f"(it has: {', '.join(f'{name} ({what})' for name, what in here.items())}); accepted here: "
                        f"{', '.join(['auto', *here])}")
    if backend != "torch" and accelerator != "cpu":
        raise UserError(f"serve --backend {backend} runs on the CPU (ONNX Runtime's CPU provider); "
                        "use --backend torch for a GPU")
    bomb = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None  # PIL refuses a header over it
    if bomb and max_pixels > bomb:
        raise UserError(f"serve --max_pixels {max_pixels}: over PIL's decompression-bomb limit of {bomb} pixels "
                        f"(2 x PIL.Image.MAX_IMAGE_PIXELS), which refuses larger images first; accepted: 1 to {bomb}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    devices = torch.cuda.device_count() if accelerator == "cuda" else 1  # LitServe starts `workers` on each
    _check_workers(workers, devices, cores, Path(export), backend)
    threads = max(1, cores // workers) if accelerator == "cpu" else None  # the cores this process may use, shared
    api = StudentAPI(export, backend, top_k, max_pixels, threads, max_batch_size=max_batch_size,
                     batch_timeout=batch_timeout if max_batch_size > 1 else 0.0)
    server = _LitServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=workers, timeout=timeout,
        model_metadata=api.metadata, info_path="/info/litserve",  # LitServe's own page: the server's settings, and
        # the metadata under "model"; GET /info is the model's, flat (below)
        restart_workers=True,  # a worker that dies is replaced
        middlewares=[(RequestGate, {"path": "/predict", "max_bytes": int(max_body_mb * (1 << 20))})],
    )
    # the model's name, version, backend, classes and input size: the fields of every /predict answer, at the top
    server.app.add_api_route("/info", lambda: JSONResponse(api.metadata), methods=["GET"])
    return server


class _LitServer(ls.LitServer):
    """LitServer whose inference processes start with Ctrl+C blocked (`ctrl_c_blocked`): pressed while they import
    torch, it would print a traceback from each; the main process stops them (SIGTERM, StudentAPI.setup)."""

    def launch_inference_worker(self, lit_api: ls.LitAPI) -> list:
        with ctrl_c_blocked():
            return super().launch_inference_worker(lit_api)

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> Any:  # a restart
        with ctrl_c_blocked():
            return super().launch_single_inference_worker(lit_api, worker_id)


def _check_workers(workers: int, devices: int, cores: int, export: Path, backend: str) -> None:
    """A UserError for more --workers than this machine holds (`workers_bound`), before any process starts."""
    weights = sum(path.stat().st_size for path in {export / BACKENDS["torch"], export / BACKENDS[backend]}
                  if path.is_file())  # what an inference process loads: the timm model, and the ONNX model served
    memory, per_process = memory_available(), weights + PROCESS_MEMORY
    bound = max(1, workers_bound(cores, memory, per_process) // devices)
    if workers > bound:
        on = f" on each of {devices} GPUs" if devices > 1 else ""
        raise UserError(f"serve --workers {workers}: this machine holds at most {bound} inference processes{on} "
                        f"(cores {cores}, memory {memory / 2**30:.1f} GiB available, at {per_process / 2**30:.2f} GiB "
                        f"a process: its weights + {PROCESS_MEMORY / 2**30:.2f} GiB of torch and its API server); "
                        f"accepted: 1 to {bound}")


def _serve(options: dict[str, Any]) -> None:
    """`distill serve`: claim the port, load the model, serve until Ctrl+C or SIGTERM."""
    # SIGTERM (docker stop, kill, a scheduler) and Ctrl+C stop the server and every process it started, from here on,
    # start-up included; the default action would leave them running, holding the port
    with StopOnSignal() as stop:
        call(listen, options)
        server = call(make_server, options)
        host, port = options["host"], options["port"]
        print(f"serving {server.model_metadata['model']} ({options['backend']}, version "
              f"{server.model_metadata['version']}) on http://{host}:{port}/predict; try: curl -F {FIELD}=@picture.png "
              f"http://{host}:{port}/predict", flush=True)
        logging.getLogger("litserve.server").addFilter(_ShutdownNoise(stop))
        # LitServe forks its process manager and API servers from this process (the inference processes are spawned:
        # StudentAPI.setup); killed by SIGKILL or the OOM killer, this process could not stop them, and they would go
        # on holding the port and the model: the kernel kills each of them when this process ends
        forks = ForkedChildrenDieWithParent()
        os.register_at_fork(before=forks.before, after_in_child=forks.after_in_child)
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    print(f"server stopped ({stop.stopped_by})" if stop.stopped_by else "server stopped", flush=True)


main = command("distill serve", make_server, listen, run=_serve, description=__doc__.split("\n\n")[0])


class _ShutdownNoise(logging.Filter):
    """LitServe's worker-monitoring thread reads the process manager that LitServe's own shutdown has just closed,
    and logs that as a crash with a traceback (litserve 0.2.19): once shutdown has begun, that record is noise."""

    def __init__(self, stop: StopOnSignal) -> None:
        super().__init__()
        self.stop = stop

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.stop.signum is not None and record.getMessage().startswith("Monitoring worker crashed"))
