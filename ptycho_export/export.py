"""Compile trained models into TorchScript and ONNX graphs, prove them, store them in the bundle.

Graphs:
- ``torchscript/diffraction_to_obj`` and ``torchscript/autoencoder``: scripted
  (traced if scripting fails), eval mode, frozen; complex outputs as in eager.
- ``onnx/diffraction_to_obj``: input ``diffraction`` [batch, C, N, N] float32,
  outputs the two real maps of the model's output mode ([batch, C, N, N]
  each: ``amplitude``/``phase`` or ``real``/``imag``). No FFT inside.
- ``onnx/autoencoder``: inputs ``diffraction`` and ``offsets`` [batch, C, 1, 2];
  outputs the two object maps and ``pred_amplitude`` (the far-field amplitude
  in photon units). The Fourier transform is a DFT as real matrix products, so
  the graph runs on every onnxruntime execution provider.

Normalisation contract (every graph, written into its metadata): the input
is the diffraction amplitude in photon units, i.e. sqrt(counts), which is the
normalised amplitude of the PtychoPINN NPZ contract × ``intensity_scale``;
the graph divides by its trained intensity scale internally. The runtime
follows this contract (ptycho_runtime.Bundle.predict).

Parity: each graph is run on fixed, simulated inputs (batches 1 and 7) and
compared with the eager model; relative error = max|graph − eager| / max|eager|
per output. Above the tolerance, export fails and nothing is written. The
inputs are stored as ``input.amplitude``, in the units ``Bundle.predict``
takes (before ``intensity_scale``), so readers re-run the whole inference
path, scale included (``ptycho_runtime.inference.parity.graph_feeds``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ptycho_runtime import format as fmt
from ptycho_runtime.format import DEFAULT_OPSET
from ptycho_runtime.inference.backends import quiet_library_warnings
from ptycho_runtime.inference.parity import (
    DEFAULT_TOLERANCE as PARITY_TOLERANCE,  # relative, float32: the readers' constant
)
from ptycho_runtime.inference.parity import graph_feeds, parity_report

from .data import make_groups, simulate_scan
from .model_manager import models_from_contents

PARITY_BATCHES = (1, 3)
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """A compiled graph does not compute what the eager model computes."""


@dataclass
class CompiledGraph:
    kind: str
    model: str
    data: bytes
    metadata: dict[str, Any]
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = field(repr=False, default=None)


# --------------------------------------------------------------------------- wrappers with real outputs


class DiffractionToObjParts(nn.Module):
    """diffraction → the two real object maps (what ONNX can carry)."""

    def __init__(self, d2o: nn.Module) -> None:
        super().__init__()
        self.d2o = d2o

    def forward(self, diffraction: torch.Tensor):
        return self.d2o.forward_parts(diffraction)


class AutoencoderParts(nn.Module):
    """(diffraction, offsets) → two object maps and the predicted far-field amplitude."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, diffraction: torch.Tensor, offsets: torch.Tensor):
        a, b, pred_amplitude, _ = self.autoencoder.forward_parts(diffraction, offsets)
        return a, b, pred_amplitude


IO_DOCS = {
    "diffraction": "diffraction amplitude in photon units (sqrt of counts = NPZ amplitude × intensity_scale)",
    "offsets": "(x, y) pixel offsets of each patch from its group centre",
    "pred_amplitude": "predicted far-field amplitude in photon units",
    "pred_intensity": "predicted intensity (counts)",
    "object": "object patches",
}


def io_spec(model_name: str, params: Mapping[str, Any], kind: str = "onnx") -> tuple[list[dict], list[dict]]:
    """Names, shapes (symbolic batch) and dtypes of a graph's inputs and outputs, with a doc string each.

    The shapes are ``bundle_format.graph_io``'s (what readers check); this adds the words.
    """
    inputs, outputs = fmt.graph_io(kind, model_name, params)
    return ([dict(i, doc=IO_DOCS[i["name"]]) for i in inputs],
            [dict(o, doc=IO_DOCS.get(o["name"], f"object patch {o['name']}")) for o in outputs])


def contract(params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "input_units": "photon amplitude: sqrt(counts) = normalised NPZ amplitude × intensity_scale",
        "intensity_scale": float(params["intensity_scale"]),
        "scale_applied_inside_graph": True,
        "output_mode": params.get("output_mode", "amp_phase"),
        "complex_from_outputs": ("amplitude·exp(i·phase)" if params.get("output_mode", "amp_phase") == "amp_phase"
                                 else "real + i·imag"),
    }


# --------------------------------------------------------------------------- parity inputs


def parity_inputs(params: Mapping[str, Any], seed: int = 1234) -> dict[str, dict[str, np.ndarray]]:
    """A few real simulated patterns (with the bundle's probe), batches 1 and 7, in predict's units.

    ``input.amplitude`` is the normalised amplitude (the NPZ contract) that
    ``Bundle.predict`` takes; graphs get it × intensity_scale (``graph_feeds``).
    """
    N, gridsize = int(params["N"]), int(params["gridsize"])
    probe = params.get("probe")
    scan = simulate_scan(N=N, object_size=3 * N, scan="random", n_positions=max(PARITY_BATCHES) * gridsize**2 + 8,
                         nphotons=float(params.get("nphotons", 1e9)), seed=seed,
                         probe=None if probe is None else np.asarray(probe, np.complex64))
    groups = make_groups(scan, gridsize, seed=seed)
    cases = {}
    for b in PARITY_BATCHES:
        cases[f"b{b}"] = {
            "input.amplitude": groups.diffraction[:b].astype(np.float32),
            "input.offsets": groups.offsets[:b].astype(np.float32),
        }
    return cases


def eager_runners(models: Mapping[str, nn.Module], params: Mapping[str, Any]) -> dict[str, tuple[Runner, list[str]]]:
    """One runner per model and the outputs it returns: the graph outputs' real maps and the complex object.

    The one eager reference: export stores its outputs as parity vectors,
    ``verify`` recomputes them. A runner takes graph feeds (photon units,
    ``parity.graph_feeds``) and returns ``{output name: array}``.
    """
    d2o, ae = models["diffraction_to_obj"], models["autoencoder"]
    d2o_names = [o["name"] for o in io_spec("diffraction_to_obj", params)[1]]
    ae_names = [o["name"] for o in io_spec("autoencoder", params)[1]]

    def run_d2o(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(feeds["diffraction"]))
        with torch.inference_mode():
            out = {n: v.numpy() for n, v in zip(d2o_names, d2o.forward_parts(x), strict=True)}
            obj = d2o(x)
        out["object_real"], out["object_imag"] = obj.real.numpy(), obj.imag.numpy()
        return out

    def run_ae(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(feeds["diffraction"]))
        off = torch.from_numpy(np.ascontiguousarray(feeds["offsets"]))
        with torch.inference_mode():
            out = {n: v.numpy() for n, v in zip(ae_names, ae.forward_parts(x, off)[:3], strict=True)}
            obj = ae(x, off)[0]
        out["object_real"], out["object_imag"] = obj.real.numpy(), obj.imag.numpy()
        return out

    return {"diffraction_to_obj": (run_d2o, d2o_names + ["object_real", "object_imag"]),
            "autoencoder": (run_ae, ae_names + ["object_real", "object_imag"])}


def eager_outputs(models: Mapping[str, nn.Module], params: Mapping[str, Any],
                  cases: Mapping[str, dict[str, np.ndarray]]) -> None:
    """Add ``<model>.<output>`` eager results (``eager_runners``) to each parity case, in place."""
    runners = eager_runners(models, params)
    scale = float(params["intensity_scale"])
    for case in cases.values():
        for name, (run, _) in runners.items():
            for key, value in run(graph_feeds(case, name, scale)).items():
                case[f"{name}.{key}"] = value


# --------------------------------------------------------------------------- exporters


@contextlib.contextmanager
def _quiet():
    """TorchScript and the exporters warn and log on every call; keep the user's console clean.

    ``sys.stdout`` is never swapped (that would silence every thread of a host
    application while a graph compiles): the ONNX exporter's progress lines
    are turned off at their source (``verbose=False`` in ``export_onnx``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def export_torchscript(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[bytes, str]:
    """Script (or trace, if scripting fails) and freeze; return the archive bytes and the method."""
    model = copy.deepcopy(model).eval()
    with _quiet():
        try:
            compiled, method = torch.jit.script(model), "script"
        except Exception as exc:  # noqa: BLE001 - scripting has many unsupported constructs; tracing is the fallback
            log.info("torch.jit.script failed (%s); tracing instead", exc)
            compiled, method = torch.jit.trace(model, example, check_trace=False), "trace"
        frozen = torch.jit.freeze(compiled)
        buf = io.BytesIO()
        torch.jit.save(frozen, buf)
    return buf.getvalue(), method


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: Sequence[str],
                output_names: Sequence[str], opset: int) -> bytes:
    """torch.export-based ONNX export with a dynamic batch axis, weights embedded."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = {name: {0: batch} for name in input_names}
    with _quiet():
        program = torch.onnx.export(module.eval(), example, dynamo=True, opset_version=opset, external_data=False,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic, verbose=False)
    data = program.model_proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def _onnx_runner(data: bytes) -> Runner:
    from ptycho_runtime.inference.backends import import_onnxruntime

    ort = import_onnxruntime()  # onnxruntime or onnxruntime-gpu, whichever extra was installed
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds), strict=True))


def torchscript_runner(data: bytes, model_name: str) -> Runner:
    """Load archive bytes; the runner returns the complex object as object_real/object_imag.

    TorchScript's deprecation warnings are filtered once (``quiet_library_warnings``),
    not per call: ``warnings.catch_warnings`` is process-global and not thread-safe.
    """
    quiet_library_warnings()
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(feeds["diffraction"])]
        if model_name == "autoencoder":
            args.append(torch.from_numpy(feeds["offsets"]))
        with torch.inference_mode():
            out = module(*args)
        obj = out[0] if model_name == "autoencoder" else out
        result = {"object_real": obj.real.numpy(), "object_imag": obj.imag.numpy()}
        if model_name == "autoencoder":
            result["pred_amplitude"] = out[1].numpy()
        return result

    return run


def parity_keys(graph_kind: str, model_name: str, metadata: Mapping[str, Any]) -> list[str]:
    """The outputs a graph is compared on: its real outputs (ONNX) or the complex object's parts."""
    if graph_kind == "onnx":
        return [o["name"] for o in metadata["outputs"]]
    return ["object_real", "object_imag"] + (["pred_amplitude"] if model_name == "autoencoder" else [])


def check_parity(graph: CompiledGraph, cases: Mapping[str, Mapping[str, np.ndarray]], intensity_scale: float,
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Run a graph on every parity case; raise ParityError above tolerance; return the report."""
    outputs = parity_keys(graph.kind, graph.model, graph.metadata)
    got, ref = {}, {}
    for case_name, case in cases.items():
        result = graph.run(graph_feeds(case, graph.model, intensity_scale))
        for name in outputs:
            key = f"{case_name}.{name}"
            got[key], ref[key] = result[name], case[f"{graph.model}.{name}"]
    report = parity_report(ref, got, tolerance)
    if not report["passed"]:
        worst = max(report["per_output"].items(), key=lambda kv: kv[1]["rel"])
        raise ParityError(
            f"{graph.kind} graph for {graph.model} disagrees with the eager model: relative error "
            f"{worst[1]['rel']:.3g} on {worst[0]} exceeds the tolerance {tolerance:g}. The graph is not stored.")
    return report


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}


def compile_graphs(models: Mapping[str, nn.Module], params: Mapping[str, Any], cases: Mapping[str, Any],
                   opset: int = DEFAULT_OPSET, torchscript: bool = True, onnx: bool = True,
                   tolerance: float = PARITY_TOLERANCE) -> list[CompiledGraph]:
    """Export, then parity-check, every requested graph. Raises ParityError on the first untrue graph."""
    versions = _versions()
    scale = float(params["intensity_scale"])
    example = graph_feeds(cases[f"b{max(PARITY_BATCHES)}"], "autoencoder", scale)
    x = torch.from_numpy(example["diffraction"])
    off = torch.from_numpy(example["offsets"])
    graphs: list[CompiledGraph] = []
    for model_name in fmt.MODEL_NAMES:
        inputs, outputs = io_spec(model_name, params)
        base = {"model": model_name, "inputs": inputs, "outputs": outputs, "contract": contract(params),
                "torch_version": versions["torch"], "onnx_version": versions["onnx"], "frozen": True}
        args = (x, off) if model_name == "autoencoder" else (x,)
        if torchscript:
            t0 = time.perf_counter()
            data, method = export_torchscript(models[model_name], args)
            meta = {**base, "kind": "torchscript", "method": method, "exporter": f"torch.jit.{method}",
                    "exporter_version": versions["torch"], "opset": None, "export_time_s": time.perf_counter() - t0,
                    "outputs": io_spec(model_name, params, "torchscript")[1]}
            graphs.append(CompiledGraph("torchscript", model_name, data, meta, torchscript_runner(data, model_name)))
        if onnx:
            t0 = time.perf_counter()
            module: nn.Module
            if model_name == "autoencoder":
                module = AutoencoderParts(copy.deepcopy(models[model_name]).eval())
                module.autoencoder.physics.far_field.use_matmul = True
            else:
                module = DiffractionToObjParts(models[model_name])
            data = export_onnx(module, args, [i["name"] for i in inputs], [o["name"] for o in outputs], opset)
            meta = {**base, "kind": "onnx", "method": "torch.export", "exporter": "torch.onnx.export(dynamo=True)",
                    "exporter_version": versions["torch"], "onnxscript_version": versions["onnxscript"],
                    "opset": opset, "export_time_s": time.perf_counter() - t0,
                    "fft": "DFT as MatMul (fftshift folded into the matrices)" if model_name == "autoencoder"
                    else "none"}
            graphs.append(CompiledGraph("onnx", model_name, data, meta, _onnx_runner(data)))
    for g in graphs:
        g.metadata["parity"] = check_parity(g, cases, scale, tolerance)
        g.metadata["sha256"] = fmt.sha256_hex(g.data)
        g.metadata["size_bytes"] = len(g.data)
    return graphs


def add_graphs_to_bundle(path: str | os.PathLike, opset: int = DEFAULT_OPSET, torchscript: bool = True,
                         onnx: bool = True, force: bool = False, tolerance: float = PARITY_TOLERANCE
                         ) -> dict[str, Any]:
    """Compile the bundle's eager models, check parity, and write graphs + parity vectors in place, atomically.

    Idempotent: graphs already present are kept unless ``force``. The models
    are rebuilt from the bundle's own params; the global ``params.cfg`` is
    left as it was. Returns a summary with each graph's size, parity and
    export time.
    """
    bundle_path = fmt.resolve_bundle_path(path)
    contents = fmt.read_bundle(bundle_path)
    missing = [m for m in fmt.MODEL_NAMES if m not in contents.state_dicts]
    if missing:
        raise fmt.BundleFormatError(f"{bundle_path} has no eager weights for {', '.join(missing)}: graphs are "
                                    "compiled from eager weights. Re-save the model with save_torch_bundle.")
    wanted = [(k, m) for k in (("torchscript",) if torchscript else ()) + (("onnx",) if onnx else ())
              for m in fmt.MODEL_NAMES]
    todo = [g for g in wanted if force or g not in contents.graphs]
    start = time.perf_counter()
    summary: dict[str, Any] = {"bundle": str(bundle_path), "graphs": {}, "written": False}
    if todo:
        models = models_from_contents(contents)  # the bundle's own config; params.cfg is not touched
        bundle_params = contents.params
        cases = parity_inputs(bundle_params)
        eager_outputs(models, bundle_params, cases)
        kinds = {k for k, _ in todo}
        graphs = [g for g in compile_graphs(models, bundle_params, cases, opset, "torchscript" in kinds,
                                            "onnx" in kinds, tolerance)
                  if (g.kind, g.model) in todo]
        fmt.write_graphs(bundle_path, [fmt.GraphRecord(g.kind, g.model, g.data, g.metadata) for g in graphs], cases)
        summary["written"] = True
    summary["export_time_s"] = time.perf_counter() - start
    for (kind, model), rec in sorted(fmt.read_bundle(bundle_path).graphs.items()):
        summary["graphs"][f"{kind}/{model}"] = {
            "size_bytes": rec.metadata.get("size_bytes", len(rec.data)),
            "method": rec.metadata.get("method"), "opset": rec.metadata.get("opset"),
            "max_rel_error": rec.metadata.get("parity", {}).get("max_rel"),
            "max_abs_error": rec.metadata.get("parity", {}).get("max_abs"),
            "export_time_s": rec.metadata.get("export_time_s"),
            "refreshed": (kind, model) in todo,
        }
    return summary
