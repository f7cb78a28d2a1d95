"""ONNX graphs whose tensors could outgrow the model, refused before onnxruntime allocates them.

Why: the op allow-list keeps control flow out, but Expand, Reshape, Resize,
Pad and Slice take their output's shape from a tensor, and a crafted graph
can make that tensor as large as it likes, or grow with the square of the
batch, while its outputs keep the declared shapes and pass the parity check.
onnxruntime then allocates it during the load's self-test or the first
batch: a graph that expands one output 2^18-fold asks for 13 GB at the parity
batch of 3. The exporter computes shapes only from its input's shape
(``Shape`` → Gather / Concat / Squeeze / Unsqueeze / Cast / Slice, times,
over or plus a constant ≥ 0), so that is the rule: every shape input is a
constant or such an expression. Each such value then never falls as the
batch grows, nor does any dimension set from one, and onnx's shape
inference at batch 1 and at ``MAX_GRAPH_BATCH`` bounds every tensor for
every batch in between (what it cannot prove: a Reshape's −1, a ratio of two
such sizes, may peak in between; by the ratio of its factors, and only
where the batch divides it exactly). The
bounds: one tensor ≤ ``ONNX_TENSOR_FACTOR``, all tensors together ≤
``ONNX_TOTAL_FACTOR`` elements per pattern and unit C·N²·n_filters_scale
(the exporter's graphs, N 64–256, gridsize 1–3: at most 32 and 471).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .schema import MAX_GRAPH_BATCH, MAX_ONNX_NODES, ONNX_TENSOR_FACTOR, ONNX_TOTAL_FACTOR

# op → the input positions that set an output's shape
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Resize": (1, 2, 3), "Pad": (1, 3), "Slice": (1, 2, 3, 4),
                "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,)}
# ops that carry a shape expression on (all inputs shape expressions or constants)
_SELECT_OPS = frozenset({"Gather", "Concat", "Unsqueeze", "Squeeze", "Cast", "Slice", "Identity", "Reshape",
                         "Expand"})
# with one input a shape expression and the other a constant ≥ 0, so an expression never falls as the batch grows
_MONOTONE_OPS = frozenset({"Mul", "Div", "Add"})


def check_onnx_sizes(model: Any, params: Mapping[str, Any], unsafe: Callable[[str], Exception]) -> None:
    """Refuse ``model`` (a parsed ``onnx.ModelProto``) unless every tensor is bounded as the module says."""
    g = model.graph
    if len(g.node) > MAX_ONNX_NODES:
        raise unsafe(f"has {len(g.node)} nodes; the format allows at most {MAX_ONNX_NODES}")
    _check_shape_inputs(g, unsafe)
    unit = params["gridsize"] ** 2 * params["N"] ** 2 * max(1, params.get("n_filters_scale", 1))
    small, large = (_inferred_sizes(model, batch, unsafe) for batch in (1, MAX_GRAPH_BATCH))
    total = 0
    for name, dims in small.items():
        if len(dims) != len(large[name]):
            raise unsafe(f"makes a tensor ({name[:64]!r}) whose rank changes with the batch")
        elements = 1
        for a, b in zip(dims, large[name], strict=True):
            elements *= max(a, b)
        if elements > MAX_GRAPH_BATCH * ONNX_TENSOR_FACTOR * unit:
            raise unsafe(f"makes a tensor ({name[:64]!r}) of up to {elements} elements, more than "
                         f"{ONNX_TENSOR_FACTOR}× the model's size per pattern at batch {MAX_GRAPH_BATCH}")
        total += elements
    if total > MAX_GRAPH_BATCH * ONNX_TOTAL_FACTOR * unit:
        raise unsafe(f"makes tensors of up to {total} elements in all, more than {ONNX_TOTAL_FACTOR}× the model's "
                     f"size per pattern at batch {MAX_GRAPH_BATCH}")


def _check_shape_inputs(g: Any, unsafe: Callable[[str], Exception]) -> None:
    """Every shape input is a constant, or computed from ``Shape`` outputs and constants as the exporter does."""
    from onnx import numpy_helper

    constant = {t.name for t in g.initializer}
    nonnegative = {t.name for t in g.initializer if _nonnegative(numpy_helper.to_array(t))}
    expression = set(constant)
    for index, node in enumerate(g.node):
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(name in constant for name in inputs)):
            constant.update(node.output)
            expression.update(node.output)
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and value is not None and _nonnegative(numpy_helper.to_array(value)):
                nonnegative.update(node.output)
        elif node.op_type == "Shape":
            expression.update(node.output)
        elif inputs and all(name in expression for name in inputs) and (
                node.op_type in _SELECT_OPS
                or (node.op_type in _MONOTONE_OPS and len(inputs) == 2
                    and sum(name not in constant for name in inputs) == 1
                    and all(name in nonnegative for name in inputs if name in constant))):
            expression.update(node.output)
        for position in SHAPE_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] and node.input[position] not in expression:
                raise unsafe(f"takes the shape of node {node.name[:64] or index!r} ({node.op_type}) from a "
                             "computed tensor; the exporter takes shapes only from constants and its input's shape")


def _nonnegative(value: Any) -> bool:
    return value.dtype.kind in "iuf" and bool((value >= 0).all())


def _inferred_sizes(model: Any, batch: int, unsafe: Callable[[str], Exception]) -> dict[str, list[int]]:
    """Every node output's dimensions by onnx's shape inference with the inputs' first dimension set to ``batch``."""
    from onnx import ModelProto, shape_inference

    m = ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]  # what the file claims is not evidence
    for value in m.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = batch
    try:
        inferred = shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx's InferenceError and friends
        raise unsafe(f"fails onnx's shape inference ({type(exc).__name__})") from None
    known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    out: dict[str, list[int]] = {}
    for node in m.graph.node:
        for name in filter(None, node.output):
            value = known.get(name)
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim] \
                if value is not None and value.type.tensor_type.HasField("shape") else None
            if dims is None or min(dims, default=0) < 0:
                raise unsafe(f"has a tensor ({name[:64]!r}) whose size onnx's shape inference cannot tell "
                             "before it runs")
            out[name] = dims
    return out
