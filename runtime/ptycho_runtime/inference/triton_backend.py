"""The ``triton`` backend: run the bundle's graph on a Triton Inference Server over gRPC.

Only the graph runs remotely. Everything else — input checks and
normalisation, grouping, stitching, streaming, the load-time self-test —
stays in the client's ``Bundle`` and is unchanged, so a scan reconstructed
through Triton goes through exactly the code path of a local one.

Why the checks at connect: a model repository outlives the bundle it was
made from, and a server may hold many models. Sending frames to the wrong
model returns plausible-looking wrong patches, so before the first frame the
backend reads the server's model config and refuses (``ServerModelMismatchError``)
unless the input and outputs have this bundle's names, dims and dtypes and
the ``ptycho.sha256`` parameter equals the SHA-256 of the client's bundle
file (see ``triton_spec``). The self-test the ``Bundle`` then runs goes
through the server too, so its numbers are checked as well.

Why bounded timeouts and retries: acquisition must never freeze on a dead
server. Every call carries a deadline (``timeout_s``); a call that finds the
server unreachable (gRPC UNAVAILABLE: not started yet, restarting, gone) is
retried ``retries`` times with a doubling pause; a call that runs out of
time is not retried (the server is overloaded or hung, and resending would
add to its queue). Then ``ServerUnavailableError`` says which server, after
how many of how many batches, and what to do; ``Bundle.reconstruct`` raises
it instead of returning a partial object.

Needs ``tritonclient[grpc]``: ``pip install 'ptycho-runtime[triton]'``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, TypeVar

import numpy as np

from .. import format as fmt
from .remote_errors import RemoteError, ServerModelMismatchError, ServerUnavailableError
from .triton_spec import DEFAULT_MODEL_NAME, INPUT_NAME, PARAM_PREFIX, TritonModelSpec, model_spec

log = logging.getLogger("ptycho_runtime")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 2
RETRY_PAUSE_S = 0.5
INSTALL_HINT = "backend='triton' needs tritonclient: pip install 'ptycho-runtime[triton]'"
T = TypeVar("T")


def _import_client() -> tuple[Any, Any, Any]:
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import model_config_pb2
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return grpcclient, model_config_pb2, InferenceServerException


def normalise_url(url: Optional[str]) -> str:
    """``host:port`` for the gRPC client; ``grpc://`` is accepted, an HTTP URL is refused with the fix."""
    if not url or not isinstance(url, str):
        raise ValueError("backend='triton' needs url='HOST:PORT' of the server's gRPC endpoint (Triton's default "
                         "port is 8001)")
    u = url.strip()
    if u.startswith("grpc://"):
        u = u[len("grpc://"):]
    if u.startswith(("http://", "https://")):
        raise ValueError(f"url={url!r} is an HTTP URL; the triton backend speaks gRPC: give HOST:GRPC_PORT "
                         "(Triton's default gRPC port is 8001, its HTTP port 8000)")
    host, sep, port = u.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url must be HOST:PORT, e.g. localhost:8001 (got {url!r})")
    return u


class TritonBackend:
    """A bundle's ``diffraction_to_obj`` graph served by Triton (same ``run`` contract as ``OnnxBackend``).

    Thread-safe: tritonclient's gRPC client may be shared by threads for
    unary calls, which is all this class makes.
    """

    name = "triton"

    def __init__(self, contents: fmt.BundleContents, url: Optional[str], model_name: Optional[str] = None,
                 timeout_s: Optional[float] = None, retries: Optional[int] = None,
                 connect_timeout_s: Optional[float] = None) -> None:
        grpcclient, self._pb, self._ServerError = _import_client()
        self._grpc = grpcclient
        self.url = normalise_url(url)
        self.model_name = model_name or DEFAULT_MODEL_NAME
        self.timeout_s = float(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        self.connect_timeout_s = float(min(self.timeout_s, DEFAULT_CONNECT_TIMEOUT_S)
                                       if connect_timeout_s is None else connect_timeout_s)
        self.retries = int(DEFAULT_RETRIES if retries is None else retries)
        if not self.timeout_s > 0 or not self.connect_timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s!r})")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0 (got {retries!r})")
        self.where = f"{self.url} model {self.model_name!r}"
        self.spec = model_spec(contents, with_graph=False)
        self._client = grpcclient.InferenceServerClient(self.url)
        config = self._connect()
        self.max_batch_size = int(config.max_batch_size)
        self.device, self.precision = _device_and_precision(config, self._pb)
        self.on_gpu = self.device == "cuda"
        self.providers = [f"triton:{self.url}/{self.model_name}"]
        self.input_names = [INPUT_NAME]
        self.output_names = list(self.spec.output_names)

    # ------------------------------------------------------------------ calls with deadlines and retries

    def _call(self, what: str, fn: Callable[[], T], timeout_s: float, context: str = "") -> T:
        """Run one gRPC call; retry UNAVAILABLE ``retries`` times; map failures to the runtime's errors."""
        attempt = 0
        while True:
            try:
                return fn()
            except self._ServerError as exc:
                status = str(exc.status() or "")
                if "UNAVAILABLE" in status and attempt < self.retries:
                    pause = RETRY_PAUSE_S * 2**attempt
                    attempt += 1
                    log.warning("ptycho_runtime: Triton server %s unavailable during %s; retry %d/%d in %.1f s",
                                self.url, what, attempt, self.retries, pause)
                    time.sleep(pause)
                    continue
                raise self._translate(exc, status, what, timeout_s, attempt, context) from None

    def _translate(self, exc: Any, status: str, what: str, timeout_s: float, attempts: int,
                   context: str) -> RemoteError:
        detail = " ".join(str(exc.message() or exc).split())[:300]
        ctx = f" {context}" if context else ""
        if "UNAVAILABLE" in status:
            return ServerUnavailableError(
                f"the Triton server at {self.url} is unreachable during {what}{ctx} ({attempts + 1} attempts over "
                f"~{RETRY_PAUSE_S * (2**attempts - 1):.1f} s: {detail}). Start it (ptycho-runtime serve BUNDLE "
                f"--grpc-port PORT, or tritonserver with a repository from ptycho-runtime triton-repo) or check "
                f"the url; no partial result was kept.", self.where)
        if "DEADLINE_EXCEEDED" in status:
            return ServerUnavailableError(
                f"the Triton server at {self.url} did not answer {what}{ctx} within {timeout_s:g} s (it is hung or "
                f"overloaded). Raise timeout_s, lower the batch size, or check the server; no partial result was "
                f"kept.", self.where)
        if "NOT_FOUND" in status or "Request for unknown model" in detail:
            return ServerModelMismatchError(
                f"the Triton server at {self.url} has no model {self.model_name!r} ({detail}). Pass the model's "
                f"name (model_name=..., ptycho-runtime serve --name / triton-repo --name), or load it on the "
                f"server.", self.where)
        return RemoteError(f"the Triton server at {self.url} refused {what}{ctx} for model {self.model_name!r}: "
                           f"{status or 'error'}: {detail}", self.where)

    # ------------------------------------------------------------------ connect: is this our model?

    def _connect(self) -> Any:
        t = self.connect_timeout_s
        live = self._call("the liveness check", lambda: self._client.is_server_live(client_timeout=t), t)
        if not live:
            raise ServerUnavailableError(f"the Triton server at {self.url} answers but is not live; wait for it to "
                                         "finish starting, or restart it.", self.where)
        ready = self._call("the model readiness check",
                           lambda: self._client.is_model_ready(self.model_name, client_timeout=t), t)
        if not ready:
            raise ServerModelMismatchError(
                f"the Triton server at {self.url} has no ready model {self.model_name!r} (models: "
                f"{self._model_list(t)}). Pass the right model_name (ptycho-runtime serve/triton-repo --name), or "
                "wait until the model has loaded.", self.where)
        response = self._call("reading the model config",
                              lambda: self._client.get_model_config(self.model_name, client_timeout=t), t)
        check_model_config(response.config, self.spec, self.url, self.model_name, self._pb)
        return response.config

    def _model_list(self, timeout_s: float) -> str:
        try:
            index = self._client.get_model_repository_index(client_timeout=timeout_s)
        except self._ServerError:
            return "unknown"
        names = [f"{m.name} ({m.state or 'unknown state'})" for m in index.models]
        return ", ".join(names) or "none"

    # ------------------------------------------------------------------ inference

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float32 [B, C, N, N] in photon units → the graph's two output maps, in server batches."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.max_batch_size
        n_batches = -(-x.shape[0] // step)
        outs_a, outs_b = [], []
        for k, i in enumerate(range(0, x.shape[0], step)):
            a, b = self._infer_one(x[i:i + step], f"(batch {k + 1} of {n_batches})")
            outs_a.append(a)
            outs_b.append(b)
        if len(outs_a) == 1:
            return outs_a[0], outs_b[0]
        return np.concatenate(outs_a), np.concatenate(outs_b)

    def _infer_one(self, chunk: np.ndarray, context: str) -> tuple[np.ndarray, np.ndarray]:
        g = self._grpc
        inp = g.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        outputs = [g.InferRequestedOutput(n) for n in self.output_names]
        result = self._call("inference", lambda: self._client.infer(
            self.model_name, [inp], outputs=outputs, client_timeout=self.timeout_s), self.timeout_s, context)
        maps = []
        for name in self.output_names:
            out = result.as_numpy(name)
            if out is None or out.shape != chunk.shape or out.dtype != np.float32:
                got = "nothing" if out is None else f"{out.dtype} {list(out.shape)}"
                raise RemoteError(f"the Triton server at {self.url} returned {got} for output {name!r} of model "
                                  f"{self.model_name!r}; float32 {list(chunk.shape)} was expected. The server's "
                                  f"model does not behave like this bundle's graph.", self.where)
            maps.append(out)
        return maps[0], maps[1]


def _param(config: Any, key: str) -> Optional[str]:
    p = config.parameters.get(PARAM_PREFIX + key)
    return None if p is None else p.string_value


def _device_and_precision(config: Any, pb: Any) -> tuple[str, str]:
    """Where the server runs the graph: ``ptycho.device`` if set (serve sets it), else the instance kind."""
    device = _param(config, "device")
    if device not in ("cpu", "cuda"):
        kinds = {g.kind for g in config.instance_group}
        device = "cuda" if pb.ModelInstanceGroup.KIND_GPU in kinds else "cpu"
    precision = "fp32"
    for acc in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if acc.parameters.get("precision_mode", "").upper() == "FP16":
            precision = "fp16"
    return device, precision


def check_model_config(config: Any, spec: TritonModelSpec, url: str, model_name: str, pb: Any) -> None:
    """Refuse a server model that is not this bundle's: batching, tensors (names, dims, dtypes), sha256."""
    where = f"{url} model {model_name!r}"
    fix = (f"Serve this bundle (ptycho-runtime serve BUNDLE, or a repository from ptycho-runtime triton-repo BUNDLE "
           f"OUT_DIR --name {model_name}), or load the bundle the server runs.")

    def refuse(what: str) -> ServerModelMismatchError:
        return ServerModelMismatchError(f"the model {model_name!r} on the Triton server at {url} {what}. {fix}", where)

    if config.max_batch_size < 1:
        raise refuse(f"has max_batch_size {config.max_batch_size}; the bundle's graph takes batches, so it must be "
                     ">= 1")
    want_dims = spec.dims
    fp32 = pb.DataType.Name(pb.TYPE_FP32)
    for label, tensors, names in (("input", config.input, [INPUT_NAME]), ("output", config.output,
                                                                          list(spec.output_names))):
        got = {t.name: (pb.DataType.Name(t.data_type), [int(d) for d in t.dims]) for t in tensors}
        if sorted(got) != sorted(names):
            raise refuse(f"has {label}s {sorted(got)}, but this bundle's graph has {names} (output_mode "
                         f"{spec.output_mode!r})")
        for name in names:
            dtype, dims = got[name]
            if dtype != fp32 or dims != want_dims:
                raise refuse(f"declares {label} {name!r} as {dtype} {dims}, but this bundle (N={spec.N}, "
                             f"gridsize={spec.gridsize}) needs {fp32} {want_dims}")
    served = _param(config, "sha256")
    if served is None:
        raise refuse(f"carries no {PARAM_PREFIX}sha256 parameter, so nothing proves it runs this bundle (it was not "
                     "made by ptycho-runtime)")
    if served != spec.bundle_sha256:
        differs = [f"{k}={_param(config, k)!r} here {v!r}" for k, v in
                   (("N", str(spec.N)), ("gridsize", str(spec.gridsize)),
                    ("intensity_scale", repr(float(spec.intensity_scale))), ("output_mode", spec.output_mode))
                   if _param(config, k) not in (None, v)]
        detail = f" ({'; '.join(differs)})" if differs else ""
        raise refuse(f"runs the bundle with sha256 {served[:16]}…, but this bundle's file has sha256 "
                     f"{spec.bundle_sha256[:16]}…{detail}: it serves a different bundle or version")
