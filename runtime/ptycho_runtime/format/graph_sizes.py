"""ONNX graphs whose tensors could outgrow the model, refused before onnxruntime allocates them.

Why: the op allow-list keeps control flow out, but Expand, Reshape, Resize,
Pad and Slice take their output's shape from a tensor, and a crafted graph
can make that tensor as large as it likes, grow it with the cube of the
batch, or look a size up by the batch, while its outputs keep the declared
shapes and pass the parity check. onnxruntime then allocates it during the
load's self-test or the first batch (one output expanded 2^16-fold: 3.2 GB
at the parity batch of 3). The exporter computes shapes only from its
input's shape: ``Shape``, then Gather / Slice / Squeeze / Unsqueeze / Cast
with constant indices, Concat, and times or plus a constant ≥ 0. That is
the rule: every shape input is a constant or such an expression, so every
dimension is a non-decreasing, nearly affine function of the batch (no
table lookups, no products of two batch sizes, no falls). onnx's shape
inference at batch 1 and at ``MAX_GRAPH_BATCH`` (the file's ``value_info``
dropped) must then give every tensor a concrete shape, at most one dimension
that grows with the batch, and at each of the two batches at most
``ONNX_TENSOR_FACTOR`` elements per pattern for one tensor and
``ONNX_TOTAL_FACTOR`` for all, in units of C·N²·n_filters_scale (the
exporter's graphs, N 64–256, gridsize 1–3: at most 32 and 471). In between,
a size can lie above the straight line between the two only by one step of
a truncating Cast.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .schema import MAX_GRAPH_BATCH, MAX_ONNX_NODES, ONNX_TENSOR_FACTOR, ONNX_TOTAL_FACTOR

# op → the input positions that set an output's shape
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Resize": (1, 2, 3), "Pad": (1, 3), "Slice": (1, 2, 3, 4),
                "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,)}
# ops that carry a shape expression on: input 0 an expression, the rest (indices, starts, axes) constants, so no
# value can be looked up by the batch size; Concat joins expressions
_SELECT_OPS = frozenset({"Gather", "Unsqueeze", "Squeeze", "Cast", "Slice", "Identity", "Reshape", "Expand"})
# with one input a shape expression and the other a constant ≥ 0, so an expression never falls as the batch grows
_MONOTONE_OPS = frozenset({"Mul", "Add"})


def check_onnx_sizes(model: Any, params: Mapping[str, Any], unsafe: Callable[[str], Exception]) -> None:
    """Refuse ``model`` (a parsed ``onnx.ModelProto``) unless every tensor is bounded as the module says."""
    g = model.graph
    if len(g.node) > MAX_ONNX_NODES:
        raise unsafe(f"has {len(g.node)} nodes; the format allows at most {MAX_ONNX_NODES}")
    _check_shape_inputs(g, unsafe)
    unit = params["gridsize"] ** 2 * params["N"] ** 2 * max(1, params.get("n_filters_scale", 1))
    small, large = (_inferred_sizes(model, batch, unsafe) for batch in (1, MAX_GRAPH_BATCH))
    totals = [0, 0]
    for name, dims in small.items():
        big = large[name]
        if len(dims) != len(big):
            raise unsafe(f"makes a tensor ({name[:64]!r}) whose rank changes with the batch")
        if sum(a != b for a, b in zip(dims, big, strict=True)) > 1:
            raise unsafe(f"makes a tensor ({name[:64]!r}) that grows with the batch in more than one dimension")
        for i, (batch, shape) in enumerate(((1, dims), (MAX_GRAPH_BATCH, big))):
            elements = _product(shape)
            if elements > batch * ONNX_TENSOR_FACTOR * unit:
                raise unsafe(f"makes a tensor ({name[:64]!r}) of {elements} elements at batch {batch}, more than "
                             f"{ONNX_TENSOR_FACTOR}× the model's size per pattern")
            totals[i] += elements
    for batch, total in zip((1, MAX_GRAPH_BATCH), totals, strict=True):
        if total > batch * ONNX_TOTAL_FACTOR * unit:
            raise unsafe(f"makes tensors of {total} elements in all at batch {batch}, more than "
                         f"{ONNX_TOTAL_FACTOR}× the model's size per pattern")


def _product(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _check_shape_inputs(g: Any, unsafe: Callable[[str], Exception]) -> None:
    """Every shape input is a constant, or computed from ``Shape`` outputs and constants as the exporter does."""
    from onnx import numpy_helper

    constant = {t.name for t in g.initializer}
    nonnegative = {t.name for t in g.initializer if _nonnegative(_value(numpy_helper, t, unsafe))}
    expression = set(constant)
    for index, node in enumerate(g.node):
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(name in constant for name in inputs)):
            constant.update(node.output)
            expression.update(node.output)
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and value is not None and _nonnegative(_value(numpy_helper, value, unsafe)):
                nonnegative.update(node.output)
        elif node.op_type == "Shape":
            expression.update(node.output)
        elif node.op_type == "Concat" and inputs and all(name in expression for name in inputs):
            expression.update(node.output)
        elif (node.op_type in _SELECT_OPS and inputs and inputs[0] in expression
              and all(name in constant for name in inputs[1:])):
            expression.update(node.output)
        elif (node.op_type in _MONOTONE_OPS and len(inputs) == 2 and sum(name not in constant for name in inputs) == 1
              and all(name in expression for name in inputs)
              and all(name in nonnegative for name in inputs if name in constant)):
            expression.update(node.output)
        for position in SHAPE_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] and node.input[position] not in expression:
                raise unsafe(f"takes the shape of node {node.name[:64] or index!r} ({node.op_type}) from a "
                             "computed tensor; the exporter takes shapes only from constants and its input's shape")


def _value(numpy_helper: Any, tensor: Any, unsafe: Callable[[str], Exception]) -> Any:
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - a tensor whose bytes do not match its declared type and shape
        raise unsafe(f"holds a constant ({tensor.name[:64]!r}) whose bytes do not match its type and shape") from None


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
