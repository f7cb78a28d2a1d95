"""``ptycho-runtime serve``: a real Triton Inference Server for one bundle, without the Triton container.

Why PyTriton: several detectors or beamlines share one GPU server, and the
standard for that is Triton (dynamic batching, gRPC/HTTP, metrics), not a
home-made server. Hosts without the container get it from ``nvidia-pytriton``,
which ships the real ``tritonserver`` binary and its Python backend: the
server batches requests from every client (dynamic batching up to
``max_batch_size``, waiting at most ``max_queue_delay_us``) and hands each
batch to the runtime's own ONNX Runtime session — the verified,
self-tested session ``load_bundle`` makes, on the GPU when one works.

The served model carries the same ``ptycho.*`` parameters as a repository
from ``triton-repo`` (``triton_repository``), plus ``ptycho.device``, so the
``triton`` client backend checks it the same way.

Needs ``pip install 'ptycho-runtime[serve]'`` in a venv made from an
interpreter that ships the shared ``libpython3.X.so`` (e.g. Debian's
``/usr/bin/python3.11``), with ``numpy<2``; Triton's Python-backend stub
loads that library, and pyenv builds without ``--enable-shared`` lack it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Any, Callable, Optional, TextIO

import numpy as np

from ..inference.remote_errors import RemoteError
from .triton_repository import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MODEL_NAME,
    INPUT_NAME,
    check_max_batch_size,
    check_model_name,
    check_queue_delay,
    model_spec,
    preferred_batch_sizes,
)

log = logging.getLogger("ptycho_runtime")

INSTALL_HINT = ("ptycho-runtime serve needs PyTriton: pip install 'ptycho-runtime[serve]' in a venv made from a "
                "Python that ships libpython (e.g. Debian's /usr/bin/python3.11 -m venv ...), with numpy<2")
EXIT_TIMEOUT_S = 5  # how long tritonserver waits for in-flight requests when it stops


def _import_pytriton() -> tuple[Any, ...]:
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig


def make_infer_function(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                        output_names: tuple[str, str]) -> Callable[..., dict[str, np.ndarray]]:
    """The function Triton calls with one dynamic batch: diffraction [B, C, N, N] → the graph's two maps."""

    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        a, b = run(np.ascontiguousarray(inputs[INPUT_NAME], dtype=np.float32))
        return {output_names[0]: a, output_names[1]: b}

    return infer


def serve(bundle_path: str | os.PathLike, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
          model_name: str = DEFAULT_MODEL_NAME, device: str = "auto", instances: int = 1, host: str = "0.0.0.0",
          intra_op_threads: Optional[int] = None, log_verbose: int = 0, stream: Optional[TextIO] = None) -> None:
    """Serve the bundle's graph with Triton until SIGINT/SIGTERM (blocks).

    ``instances`` model instances share the one ONNX Runtime session
    (sessions are thread-safe), so up to that many batches run at once.
    Prints one ``serving ...`` line on ``stream`` (stderr) once the model is
    ready for clients.
    """
    from ..inference.bundle import load_bundle

    check_model_name(model_name)
    check_max_batch_size(max_batch_size)
    check_queue_delay(max_queue_delay_us)
    if isinstance(instances, bool) or not isinstance(instances, int) or not 1 <= instances <= 64:
        raise ValueError(f"instances must be 1..64 (got {instances!r})")
    check_ports_free(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig = _import_pytriton()
    bundle = load_bundle(bundle_path, backend="onnx", device=device, intra_op_threads=intra_op_threads)
    spec = model_spec(bundle.contents)
    run = bundle.run_graph  # the verified, self-tested session: the graph alone, no normalisation
    infer = batch(make_infer_function(run, spec.output_names))
    shape = tuple(spec.dims)
    config = TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, http_address=host,
                          grpc_address=host, metrics_address=host, exit_timeout_secs=EXIT_TIMEOUT_S,
                          log_verbose=log_verbose)
    model_config = ModelConfig(max_batch_size=max_batch_size, batcher=DynamicBatcher(
        max_queue_delay_microseconds=max_queue_delay_us, preferred_batch_size=preferred_batch_sizes(max_batch_size)))
    out = sys.stderr if stream is None else stream
    # SIGINT too: a server started in the background by a shell inherits SIGINT ignored
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    triton = Triton(config=config)  # not as a context manager: that starts the server before bind()
    try:
        triton.bind(model_name=model_name, infer_func=[infer] * instances,
                    inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=shape)],
                    outputs=[Tensor(name=n, dtype=np.float32, shape=shape) for n in spec.output_names],
                    config=model_config, strict=True)
        _add_parameters(triton, model_name, spec.parameters(device=bundle.device))
        try:
            triton.run()
        except Exception as exc:  # noqa: BLE001 - PyTriton/tritonclient raise many types when startup fails
            detail = " ".join(str(exc).split())[:600]
            raise RemoteError(f"tritonserver could not start serving {model_name!r} ({type(exc).__name__}: "
                              f"{detail}). Check that ports {http_port}, {grpc_port} and {metrics_port} are free "
                              "(--http-port, --grpc-port, --metrics-port) and read the server log above.",
                              f"{host}:{grpc_port}") from None
        out.write(f"serving {model_name!r} ({bundle.path}, N={bundle.N}, gridsize={bundle.gridsize}, "
                  f"{bundle.providers[0]}) on grpc {host}:{grpc_port}, http {host}:{http_port}; max batch "
                  f"{max_batch_size}, queue delay {max_queue_delay_us} us, {instances} instance(s). Ctrl-C stops.\n")
        out.flush()
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse ports already in use now: tritonserver would fail to bind and PyTriton wait minutes for it."""
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{option} must be a TCP port 1..65535 (got {port!r})")
        if port in seen:
            raise ValueError(f"{seen[port]} and {option} are both {port}; give each its own port")
        seen[port] = option
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ValueError(f"cannot listen on {host}:{port} ({option}): {exc.strerror or exc}; another "
                                 f"server may be using it: choose another port with {option}") from None


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # PyTriton's serve loop stops tritonserver cleanly on it


def _add_parameters(triton: Any, model_name: str, parameters: dict[str, str]) -> None:
    """Put the ``ptycho.*`` identity parameters into the config PyTriton generates for the model.

    PyTriton (0.7) exposes no public hook for model-config parameters; its
    generated config's ``parameters`` come from ``backend_parameters``, so
    ours are added there before the server starts. The client's connect
    check fails loudly if a PyTriton release changes this.
    """
    models = [m for m in triton._model_manager.models if m.model_name == model_name]
    if len(models) != 1:
        raise RuntimeError(f"PyTriton holds {len(models)} models named {model_name!r}; expected 1")
    models[0]._get_triton_model_config().backend_parameters.update(parameters)
