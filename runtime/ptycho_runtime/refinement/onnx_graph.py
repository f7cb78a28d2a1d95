"""The refinement-step graph: one batch of non-overlapping frames, forward and adjoint, as an ONNX model.

Built here, by the runtime, for each probe size N, rather than stored in each
bundle: the step depends only on N (not on the network), so every bundle,
including those written before refinement existed, gets it; a host runs no
graph it did not build itself (no trust in a stranger's file); and the graph
changes with the runtime that documents it, never out of step with the
numpy reference it is tested against. Building it takes milliseconds.

ONNX has no complex dtype, so a complex N×N image is float32 [N, 2, N]: each
row as its real half then its imaginary half ("row-split" layout; the canvas
likewise is [H, 2, W]). Every broadcast then runs over contiguous rows.
onnxruntime's DFT op has no GPU kernel, so the 2-D DFT F·X·F is matrix
products: on the right one real product per row with the 2N×2N matrix
K = [[Fr, Fi], [−Fi, Fr]] ([xr | xi]·K = [Re xF | Im xF]); on the left
Fr·X and Fi·X with the halves of the second swapped (Y = Fr·X + swap(Fi·X)·[−1 | 1]).
No transposes: measured, they cost more than the products.

Two forms, chosen by ``canvas_in_graph``:
- True: the graph gathers the windows from the canvas and writes them back
  (Gather / ScatterND with the windows' flat indices; no two windows of a
  batch share a pixel, so ScatterND needs no reduction). Inputs ``canvas``
  [H·2·W] and ``index`` [B, N+1, 2, N+1]; output ``new_canvas``.
- False (the CPU default, measured faster: onnxruntime's Gather/ScatterND
  go element by element, while the host copies whole window rows through a
  strided view): input ``windows`` [B, N+1, 2, N+1]; output ``update``, the
  change of each window, which the host adds back.

Other inputs: ``weights`` [4, B, 1, 1, 1] (bilinear corner weights),
``measured`` [B, N, 1, N] (unshifted |fft2| per frame),
``probe_a``/``probe_b`` and ``gain_a``/``gain_b`` [N, 2, N] (a complex factor
c as [Re c | Re c] and [−Im c | Im c], so that c·z = a·z + b·swap(z)).
Other outputs: ``misfit`` [] (Σ(|Ψ| − A)² of the batch, before its update)
and, with probe refinement, the probe step's two sums over the batch,
``probe_num`` = Σ conj(O)·F⁻¹(Ψ' − Ψ) [N, 2, N] and ``probe_den`` = Σ |O|²
[N, 1, N]: the host makes the step from them, so that a batch split between
threads (``onnx_backend``) sums its parts first. The update is
``numpy_backend.NumpyBackend.run_batch``'s, which the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .numpy_backend import TINY

OPSET = 17


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        self._n += 1
        name = f"{stem}_{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, np.int64), "i")

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self._n += 1
        name = out or f"{op.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name

    def add(self, *terms: str) -> str:
        total = terms[0]
        for t in terms[1:]:
            total = self.op("Add", [total, t])
        return total


def dft_matrix(N: int, inverse: bool) -> np.ndarray:
    """The N×N DFT matrix F (inverse: F⁻¹, with its 1/N), complex128."""
    k = np.arange(N)
    return np.exp((1 if inverse else -1) * 2j * np.pi * np.outer(k, k) / N) / (N if inverse else 1)


def dft_block_matrix(N: int, inverse: bool) -> np.ndarray:
    """K (2N×2N) with [Re x | Im x]·K = [Re xF | Im xF] for a row x."""
    F = dft_matrix(N, inverse)
    return np.block([[F.real, F.imag], [-F.imag, F.real]]).astype(np.float32)


def _dft2(g: _Graph, t: str, N: int, inverse: bool, swap_index: str, sign: str) -> str:
    """F·t·F (inverse: F⁻¹·t·F⁻¹) of each row-split frame of t [B, N, 2, N], as three matrix products."""
    F = dft_matrix(N, inverse)
    K = g.const(dft_block_matrix(N, inverse), "K")
    right = g.op("MatMul", [g.op("Reshape", [t, g.ints(-1, 2 * N)]), K])  # [B·N, 2N]: each row times K
    right = g.op("Reshape", [right, g.ints(-1, N, 2 * N)])
    real = g.op("MatMul", [g.const(F.real.astype(np.float32), "Fr"), right])
    frames = g.ints(-1, N, 2, N)
    imag = g.op("Reshape", [g.op("MatMul", [g.const(F.imag.astype(np.float32), "Fi"), right]), frames])
    swapped = g.op("Gather", [imag, swap_index], axis=2)
    return g.op("Add", [g.op("Reshape", [real, frames]), g.op("Mul", [swapped, sign])])


def _model(g: _Graph, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ptycho_runtime.refinement")
    model.ir_version = 8  # onnxruntime >= 1.18 reads IR 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_transform_graph(N: int, with_spectrum: bool = False) -> onnx.ModelProto:
    """The step graph's two 2-D DFTs alone: ``frames`` [B, N, 2, N] → ``roundtrip`` = F⁻¹(F(frames)).

    The products are half of the step's kernels and cannot be made cheaper
    without more element-wise passes, so this is what any step graph costs at
    least; benchmarks/test_refinement.py times it beside the step (its
    ``onnx_dft_floor`` row) to show what a ratio for onnxruntime can reach.
    ``with_spectrum`` also outputs F(frames) as ``spectrum`` (for tests).
    """
    g = _Graph()
    swap_index, sign = g.ints(1, 0), g.const(np.array([[-1], [1]], np.float32))
    spectrum = _dft2(g, "frames", N, False, swap_index, sign)
    g.nodes.append(helper.make_node("Identity", [_dft2(g, spectrum, N, True, swap_index, sign)], ["roundtrip"]))
    shape = ["B", N, 2, N]
    outputs = [helper.make_tensor_value_info("roundtrip", TensorProto.FLOAT, shape)]
    if with_spectrum:
        g.nodes.append(helper.make_node("Identity", [spectrum], ["spectrum"]))
        outputs.append(helper.make_tensor_value_info("spectrum", TensorProto.FLOAT, shape))
    return _model(g, f"dft_roundtrip_N{N}", [helper.make_tensor_value_info("frames", TensorProto.FLOAT, shape)],
                  outputs)


def build_step_graph(N: int, refine_probe: bool, canvas_in_graph: bool = False) -> onnx.ModelProto:
    """The ONNX model of one batch's update for N×N frames (float32), checked with onnx.checker."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    if canvas_in_graph:
        inputs = [helper.make_tensor_value_info("canvas", f32, ["S"]),
                  helper.make_tensor_value_info("index", TensorProto.INT64, ["B", N + 1, 2, N + 1])]
    else:
        inputs = [helper.make_tensor_value_info("windows", f32, ["B", N + 1, 2, N + 1])]
    inputs += [helper.make_tensor_value_info("weights", f32, [4, "B", 1, 1, 1]),
               helper.make_tensor_value_info("measured", f32, ["B", N, 1, N])]
    inputs += [helper.make_tensor_value_info(name, f32, [N, 2, N])
               for name in ("probe_a", "probe_b", "gain_a", "gain_b")]
    swap_index = g.ints(1, 0)

    def swap(t: str) -> str:  # [re | im] → [im | re] per row
        return g.op("Gather", [t, swap_index], axis=2)

    def cmul(a: str, b: str, z: str) -> str:  # c·z with c given as (a, b)
        return g.op("Add", [g.op("Mul", [a, z]), g.op("Mul", [b, swap(z)])])

    sign = g.const(np.array([[-1], [1]], np.float32))

    def dft2(t: str, inverse: bool) -> str:
        return _dft2(g, t, N, inverse, swap_index, sign)

    window = g.op("Gather", ["canvas", "index"], "window") if canvas_in_graph else "windows"  # [B, N+1, 2, N+1]
    w = [g.op("Gather", ["weights", g.const(np.array(k, np.int64))], axis=0) for k in range(4)]  # [B, 1, 1, 1]
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
    axes = g.ints(1, 3)
    o = g.add(*[g.op("Mul", [w[k], g.op("Slice", [window, g.ints(r, c), g.ints(r + N, c + N), axes])])
                for k, (r, c) in enumerate(corners)])
    spec = dft2(cmul("probe_a", "probe_b", o), inverse=False)
    plane = g.ints(2)
    re = g.op("Slice", [spec, g.ints(0), g.ints(1), plane])
    im = g.op("Slice", [spec, g.ints(1), g.ints(2), plane])
    mag = g.op("Sqrt", [g.op("Add", [g.op("Mul", [re, re]), g.op("Mul", [im, im])])])  # [B, N, 1, N]
    g.op("ReduceSumSquare", [g.op("Sub", [mag, "measured"])], "misfit", keepdims=0)
    safe = g.op("Max", [mag, g.const(np.array(TINY, np.float32))])
    factor = g.op("Sub", [g.op("Div", ["measured", safe]), g.const(np.array(1, np.float32))])
    change = g.op("Mul", [spec, factor])  # Ψ' − Ψ = Ψ·(A/|Ψ| − 1); where Ψ = 0, no change
    dpsi = dft2(change, inverse=True)
    delta = cmul("gain_a", "gain_b", dpsi)
    parts = [g.op("Pad", [g.op("Mul", [w[k], delta]), g.ints(0, r, 0, c, 0, 1 - r, 0, 1 - c)])
             for k, (r, c) in enumerate(corners)]
    if canvas_in_graph:
        updated = g.op("Add", [window, g.add(*parts)])
        index = g.op("Unsqueeze", ["index", g.ints(-1)])
        g.op("ScatterND", ["canvas", index, updated], "new_canvas")
        outputs = [helper.make_tensor_value_info("new_canvas", f32, ["S"])]
    else:
        g.nodes.append(helper.make_node("Identity", [g.add(*parts)], ["update"]))
        outputs = [helper.make_tensor_value_info("update", f32, ["B", N + 1, 2, N + 1])]
    outputs.append(helper.make_tensor_value_info("misfit", f32, []))
    if refine_probe:
        first = g.ints(0)
        o_re = g.op("Slice", [o, g.ints(0), g.ints(1), plane])
        o_im = g.op("Slice", [o, g.ints(1), g.ints(2), plane])
        # conj(o)·d = o_re·d + o_im·[di | −dr]
        conj_o_dpsi = g.op("Add", [g.op("Mul", [o_re, dpsi]), g.op("Mul", [g.op("Mul", [o_im, swap(dpsi)]),
                                                                      g.op("Neg", [sign])])])
        g.op("ReduceSum", [conj_o_dpsi, first], "probe_num", keepdims=0)  # [N, 2, N]
        g.op("ReduceSum", [g.op("ReduceSumSquare", [o], axes=[2], keepdims=1), first], "probe_den", keepdims=0)
        outputs += [helper.make_tensor_value_info("probe_num", f32, [N, 2, N]),
                    helper.make_tensor_value_info("probe_den", f32, [N, 1, N])]
    return _model(g, f"refine_step_N{N}", inputs, outputs)
