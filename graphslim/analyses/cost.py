"""Cost analysis: MACs, parameters and bytes per node and in total.

MACs count multiply-accumulates of conv, conv-transpose, linear/matmul and attention (the ops that
torch.utils.flop_counter counts, at FLOPs = 2 x MACs); elementwise ops, norms and pools count 0.
Parameters count unique floating tensors of more than one element that are weights (BN running
statistics are buffers, not parameters, as in torch). Bytes are what a node reads and writes
(weights + activations): at batch 1 many layers are bandwidth-bound, so MACs alone mislead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analyses import Analysis, AnalysisManager, Shapes
from graphslim.ir import GraphView, Node, OpKind

_NOT_PARAMS = {"mean", "var"}


@dataclass(frozen=True)
class NodeCost:
    macs: int
    params: int
    bytes: int


@dataclass(frozen=True)
class CostReport:
    per_node: dict[str, NodeCost]
    macs: int
    params: int
    weight_bytes: int

    def top(self, n: int = 10) -> list[tuple[str, NodeCost]]:
        return sorted(self.per_node.items(), key=lambda kv: -kv[1].macs)[:n]


def _prod(shape) -> int:
    return int(np.prod([d for d in shape], dtype=np.int64)) if shape is not None else 0


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def node_macs(view: GraphView, node: Node, shapes: dict[str, tuple]) -> int:
    """Multiply-accumulates of one node for the shapes given (0 where a shape is unknown)."""
    out = shapes.get(node.output)
    kind = node.kind
    if kind is OpKind.CONV and _known(out):
        w, _ = view.param_info(node.name, "weight")
        return _prod(out) * _prod(w[1:])
    if kind is OpKind.CONV_TRANSPOSE and node.inputs and _known(shapes.get(node.inputs[0])):
        w, _ = view.param_info(node.name, "weight")
        return _prod(shapes[node.inputs[0]]) * _prod(w[1:])
    if kind is OpKind.LINEAR and _known(out):
        w, _ = view.param_info(node.name, "weight")
        return _prod(out) * w[1]
    if kind is OpKind.MATMUL and "equation" in node.attrs:
        return _einsum_macs(node.attrs["equation"], [shapes.get(v) for v in node.inputs])
    if kind is OpKind.MATMUL and _known(out) and node.inputs:
        left = "x" if "x" in node.params else "in0" if "in0" in node.params else None
        a = shapes.get(node.inputs[0]) if left is None else None
        if not _known(a) and node.params:  # constant left operand (fx / ONNX: role x / in0)
            a, _ = view.param_info(node.name, left or next(iter(node.params)))
        return _prod(out) * a[-1] if _known(a) else 0
    if kind is OpKind.ATTENTION and len(node.inputs) >= 1:
        return _attention_macs(node, [shapes.get(v) for v in node.inputs])
    return 0


def _einsum_macs(equation: str, in_shapes: list) -> int:
    """Product of the sizes of every index letter (one multiply-add per index combination)."""
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if "..." in equation or len(lhs) != len(in_shapes) or not all(map(_known, in_shapes)):
        return 0
    sizes: dict[str, int] = {}
    for letters, shape in zip(lhs, in_shapes):
        sizes.update(zip(letters, shape))
    return _prod(sizes.values()) if len(lhs) > 1 else 0


def _attention_macs(node: Node, in_shapes: list) -> int:
    """nn.MultiheadAttention: q/k/v projections, Q K^T, A V, output projection."""
    q = in_shapes[0]
    k = in_shapes[1] if len(in_shapes) > 1 and in_shapes[1] else q
    if not (_known(q) and _known(k)):
        return 0
    e = node.attrs["embed_dim"]
    inner = node.attrs.get("inner_dim", e)  # pruned attention: q/k/v width apart from e
    out = node.attrs.get("out_dim", e)
    if node.attrs.get("batch_first"):
        n, length, s = q[0], q[1], k[1]
    else:
        length, n, s = q[0], q[1], k[0]
    kdim, vdim = node.attrs.get("kdim", e), node.attrs.get("vdim", e)
    return n * (length * e * inner + s * kdim * inner + s * vdim * inner
                + 2 * length * s * inner + length * inner * out)


def _is_param(view: GraphView, node: Node, role: str) -> bool:
    """A weight: floating tensors of more than one element, and the integer weights a
    DequantizeLinear reads (after qdq); BN statistics and quantization grids are not."""
    if node.kind is OpKind.BATCHNORM and role in _NOT_PARAMS:
        return False
    shape, dtype = view.param_info(node.name, role)
    if node.kind in (OpKind.QUANTIZE, OpKind.DEQUANTIZE):
        return role == "x" and _prod(shape) > 1
    return dtype.kind == "f" and _prod(shape) > 1


def compute_cost(view: GraphView, shapes: dict[str, tuple],
                 opaque_macs: dict[str, int] | None = None) -> CostReport:
    """Per-node and total cost; `opaque_macs` supplies MACs the frontend measured for nodes
    graphslim does not model."""
    opaque_macs = opaque_macs or {}
    per_node: dict[str, NodeCost] = {}
    seen_keys: dict[str, int] = {}
    stored: set[str] = set()
    weight_bytes = 0
    for node in view.nodes():
        params = 0
        nbytes = 0
        for role, key in node.params.items():
            shape, dtype = view.param_info(node.name, role)
            size = _prod(shape)
            nbytes += size * dtype.itemsize
            if key not in stored:
                stored.add(key)
                weight_bytes += size * dtype.itemsize
            if _is_param(view, node, role):
                params += size
                seen_keys.setdefault(key, size)
        for v in (*node.inputs, *node.outputs):
            if _known(shapes.get(v)):
                nbytes += _prod(shapes[v]) * 4
        macs = opaque_macs.get(node.name) or node_macs(view, node, shapes)
        per_node[node.name] = NodeCost(macs, params, nbytes)
    return CostReport(per_node, sum(c.macs for c in per_node.values()),
                      sum(seen_keys.values()), weight_bytes)


class Cost(Analysis):
    name = "cost"

    @classmethod
    def compute(cls, am: AnalysisManager) -> CostReport:
        shapes = am.get(Shapes)
        measured = am.model.opaque_macs(shapes)
        return compute_cost(am.view, shapes, measured)


def chain_macs(layers, in_shape: tuple) -> int:
    """MACs of edit-vocabulary Layers (graphslim.edits.Layer) applied in sequence to an input of
    `in_shape`: what a planned chain will cost before it exists."""
    shape, total = tuple(in_shape), 0
    for layer in layers:
        w = layer.weight
        if layer.kind is OpKind.LINEAR:
            total += int(np.prod(shape[:-1])) * w.shape[1] * w.shape[0]
            shape = (*shape[:-1], w.shape[0])
            continue
        nd = w.ndim - 2
        strides = layer.strides or (1,) * nd
        pads = layer.pads or (0,) * 2 * nd
        dil = layer.dilations or (1,) * nd
        spatial = tuple((shape[2 + i] + pads[i] + pads[nd + i] - dil[i] * (w.shape[2 + i] - 1)
                         - 1) // strides[i] + 1 for i in range(nd))
        shape = (shape[0], w.shape[0], *spatial)
        total += int(np.prod(shape)) * int(np.prod(w.shape[1:]))
    return total
