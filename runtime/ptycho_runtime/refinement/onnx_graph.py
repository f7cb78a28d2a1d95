"""The refinement-step graph: one batch of non-overlapping frames, forward and adjoint, as an ONNX model.

Built here, by the runtime, for each probe size N, rather than stored in each
bundle: the step depends only on N (not on the network), so every bundle,
including those written before refinement existed, gets it; a host runs no
graph it did not build itself (no trust in a stranger's file); and the graph
changes with the runtime that documents it, never out of step with the
numpy reference it is tested against. Building it takes milliseconds.

ONNX has no complex dtype, so a complex array is float32 with a trailing
(real, imaginary) axis of 2 — numpy's complex64 memory layout, so the canvas
passes in and out without a copy. onnxruntime's DFT op has no GPU kernel and,
measured here, is slower on the CPU than matrix products, so the 2-D DFT is
two real matrix products with the 2N×2N block form K of the DFT matrix
(rows as [.., re, im, ..]): T(X) = ((X·K)ᵀ)·K = DFT2(X)ᵀ. The graph works on
the transposed spectrum (the host passes the measured amplitudes transposed),
and the same T with the inverse matrix turns it back: T⁻¹(Dᵀ) = IDFT2(D).

Inputs: ``obj`` [S, 2] (the canvas, flattened), ``index`` [B, N+1, N+1]
(each window's flat canvas indices, from the host: no two windows of a batch
share a pixel), ``weights`` [4, B, 1, 1, 1] (bilinear corner weights),
``measured_t`` [B, N, N, 1] (unshifted |fft2| per frame, transposed),
``probe_a``/``probe_b`` and ``gain_a``/``gain_b`` [N, N, 2] (a complex factor
c as [Re c, Re c] and [−Im c, Im c], so that c·z = a·z + b·swap(z)); for
probe refinement also ``probe`` [N, N, 2] and ``probe_alpha`` [].
Outputs: ``new_obj`` [S, 2], ``misfit`` [] (Σ(|Ψ| − A)² of the batch, before
its update) and, with probe refinement, ``new_probe`` [N, N, 2]. The update
is that of ``numpy_backend.NumpyBackend.run_batch``, which the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, stem: str, value: np.ndarray) -> str:
        self._n += 1
        name = f"{stem}_{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

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


def dft_block_matrix(N: int, inverse: bool) -> np.ndarray:
    """The real 2N×2N matrix K with [.., Re z_c, Im z_c, ..]·K = [.., Re (zF)_d, Im (zF)_d, ..]; inverse: F⁻¹."""
    k = np.arange(N)
    F = np.exp((1 if inverse else -1) * 2j * np.pi * np.outer(k, k) / N) / (N if inverse else 1)
    K = np.zeros((2 * N, 2 * N))
    K[0::2, 0::2], K[0::2, 1::2] = F.real, F.imag
    K[1::2, 0::2], K[1::2, 1::2] = -F.imag, F.real
    return K.astype(np.float32)


def build_step_graph(N: int, refine_probe: bool) -> onnx.ModelProto:
    """The ONNX model of one batch's update for N×N frames (float32), checked with onnx.checker."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("obj", f32, ["S", 2]),
              helper.make_tensor_value_info("index", TensorProto.INT64, ["B", N + 1, N + 1]),
              helper.make_tensor_value_info("weights", f32, [4, "B", 1, 1, 1]),
              helper.make_tensor_value_info("measured_t", f32, ["B", N, N, 1])]
    inputs += [helper.make_tensor_value_info(name, f32, [N, N, 2])
               for name in ("probe_a", "probe_b", "gain_a", "gain_b")]
    if refine_probe:
        inputs += [helper.make_tensor_value_info("probe", f32, [N, N, 2]),
                   helper.make_tensor_value_info("probe_alpha", f32, [])]
    swap_index = g.const("swap", np.array([1, 0], np.int64))

    def swap(t: str) -> str:
        return g.op("Gather", [t, swap_index], axis=3)

    def cmul(a: str, b: str, z: str) -> str:  # c·z with c given as (a, b)
        return g.op("Add", [g.op("Mul", [a, z]), g.op("Mul", [b, swap(z)])])

    rows2 = g.const("rows", np.array([-1, 2 * N], np.int64))
    frames = g.const("frames", np.array([-1, N, N, 2], np.int64))

    def half(t: str, K: str) -> str:
        return g.op("Reshape", [g.op("MatMul", [g.op("Reshape", [t, rows2]), K]), frames])

    def T(t: str, K: str) -> str:  # ((t·K)ᵀ)·K per frame = DFT2(t)ᵀ (K forward) or IDFT2(t)ᵀ (K inverse)
        return half(g.op("Transpose", [half(t, K)], perm=[0, 2, 1, 3]), K)

    K_fwd, K_inv = g.const("dft", dft_block_matrix(N, False)), g.const("idft", dft_block_matrix(N, True))
    window = g.op("Gather", ["obj", "index"], "window")  # [B, N+1, N+1, 2]
    w = [g.op("Gather", ["weights", g.const("k", np.array(k, np.int64))], axis=0) for k in range(4)]  # [B,1,1,1]
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
    axes12 = g.const("axes", np.array([1, 2], np.int64))
    o = g.add(*[g.op("Mul", [w[k], g.op("Slice", [window, g.const("st", np.array([r, c], np.int64)),
                                                  g.const("en", np.array([r + N, c + N], np.int64)), axes12])])
                for k, (r, c) in enumerate(corners)])
    spec_t = T(cmul("probe_a", "probe_b", o), K_fwd)
    mag = g.op("Sqrt", [g.op("ReduceSumSquare", [spec_t], axes=[3], keepdims=1)])  # [B, N, N, 1]
    g.op("ReduceSumSquare", [g.op("Sub", [mag, "measured_t"])], "misfit", keepdims=0)
    lit = g.op("Greater", [mag, g.const("zero", np.array(0, np.float32))])
    factor = g.op("Sub", [g.op("Div", ["measured_t", g.op("Max", [mag, g.const("tiny", np.array(1e-30, np.float32))])]),
                          g.const("one", np.array(1, np.float32))])
    measured_pair = g.op("Pad", ["measured_t", g.const("pads", np.array([0, 0, 0, 0, 0, 0, 0, 1], np.int64))])
    change_t = g.op("Where", [lit, g.op("Mul", [spec_t, factor]), measured_pair])  # Ψ' − Ψ (Ψ = 0: A)
    dpsi = T(change_t, K_inv)  # IDFT2(Ψ' − Ψ), upright again
    delta = cmul("gain_a", "gain_b", dpsi)
    parts = [g.op("Pad", [g.op("Mul", [w[k], delta]),
                          g.const("pads", np.array([0, r, c, 0, 0, 1 - r, 1 - c, 0], np.int64))])
             for k, (r, c) in enumerate(corners)]
    updated = g.op("Add", [window, g.add(*parts)])
    index = g.op("Unsqueeze", ["index", g.const("last", np.array([-1], np.int64))])
    g.op("ScatterND", ["obj", index, updated], "new_obj")
    outputs = [helper.make_tensor_value_info("new_obj", f32, ["S", 2]),
               helper.make_tensor_value_info("misfit", f32, [])]
    if refine_probe:
        first = g.const("axis0", np.array([0], np.int64))
        o_re = g.op("Slice", [o, g.const("s", np.array([0], np.int64)), g.const("e", np.array([1], np.int64)),
                              g.const("a", np.array([3], np.int64))])
        o_im = g.op("Slice", [o, g.const("s", np.array([1], np.int64)), g.const("e", np.array([2], np.int64)),
                              g.const("a", np.array([3], np.int64))])
        sign = g.const("sign", np.array([1, -1], np.float32))
        conj_o_dpsi = g.op("Add", [g.op("Mul", [o_re, dpsi]), g.op("Mul", [g.op("Mul", [o_im, swap(dpsi)]), sign])])
        num = g.op("ReduceSum", [conj_o_dpsi, first], keepdims=0)  # [N, N, 2]
        den = g.op("ReduceSum", [g.op("ReduceSumSquare", [o], axes=[3], keepdims=1), first], keepdims=0)
        a = "probe_alpha"
        scale = g.op("Add", [g.op("Mul", [g.op("Sub", [g.const("one", np.array(1, np.float32)), a]), den]),
                             g.op("Mul", [a, g.op("ReduceMax", [den], keepdims=0)])])
        g.op("Add", ["probe", g.op("Div", [num, scale])], "new_probe")
        outputs.append(helper.make_tensor_value_info("new_probe", f32, [N, N, 2]))
    graph = helper.make_graph(g.nodes, f"refine_step_N{N}", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ptycho_runtime.refinement")
    model.ir_version = 8  # onnxruntime >= 1.18 reads IR 8
    onnx.checker.check_model(model, full_check=True)
    return model
