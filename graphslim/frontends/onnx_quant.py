"""QuantizeValue / QuantizeParam / ScaleValue on an onnx-graphsurgeon graph (the ONNX frontend's
half of the quantization edits). The layout is the one ONNX Runtime's QDQ fusions look for: a
Quantize on the producer's output, a Dequantize private to each reader, integer weights stored
as initializers read through their own Dequantize; a ScaleValue is a Mul by a constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphslim.frontends import onnx_ops as ops
from graphslim.ir import Node, OpKind

_NP = {"uint8": np.uint8, "int8": np.int8}


class Namer:
    """Fresh tensor / node names for many insertions (one scan of the graph, then a counter)."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def quantize_value(graph: gs.Graph, fresh: Namer, value: str, scale: float, zero_point: int,
                   dtype: str, users: tuple[str, ...]) -> None:
    tensors = graph.tensors()
    if value not in tensors or isinstance(tensors[value], gs.Constant):
        raise ValueError(f"QuantizeValue: '{value}' is not an activation of the graph")
    x = tensors[value]
    readers = [n for n in list(x.outputs) if not users or n.name in users]
    if not readers:
        return
    s = gs.Constant(fresh(f"{value}_scale"), np.array(scale, np.float32))
    z = gs.Constant(fresh(f"{value}_zero_point"), np.array(zero_point, _NP[dtype]))
    q = gs.Variable(fresh(f"{value}_quantized"), dtype=_NP[dtype])
    graph.nodes.append(gs.Node("QuantizeLinear", fresh(f"{value}_QuantizeLinear"), {},
                               [x, s, z], [q]))
    for reader in readers:
        xd = gs.Variable(fresh(f"{value}_dq_{reader.name}"), dtype=np.float32)
        graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{value}_DequantizeLinear"), {},
                                   [q, s, z], [xd]))
        for j, t in enumerate(reader.inputs):
            if t is x:
                reader.inputs[j] = xd


def quantize_param(graph: gs.Graph, fresh: Namer, g: gs.Node, node: Node, role: str,
                   values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                   axis: int | None) -> None:
    slot = ops.slot(g.op, role)
    const = g.inputs[slot] if slot < len(g.inputs) else None
    if not isinstance(const, gs.Constant):
        raise ValueError(f"node '{g.name}': parameter '{role}' is not a constant")
    q = np.asarray(values)
    if q.dtype.kind not in "iu":
        raise ValueError(f"node '{g.name}': quantized '{role}' must be integers, not {q.dtype}")
    stored_axis = axis
    if node.kind is OpKind.LINEAR and role == "weight" and node.attrs.get("layout") == "in_out":
        q, stored_axis = q.T, None if axis is None else q.ndim - 1 - axis
    scale = np.asarray(scale, np.float32).reshape(-1)
    zero_point = np.asarray(zero_point).reshape(-1).astype(q.dtype)
    per_tensor = scale.size == 1
    qc = gs.Constant(fresh(f"{const.name}_quantized"), np.ascontiguousarray(q))
    sc = gs.Constant(fresh(f"{const.name}_scale"), np.asarray(scale[0]) if per_tensor else scale)
    zc = gs.Constant(fresh(f"{const.name}_zero_point"),
                     np.asarray(zero_point[0]) if per_tensor else zero_point)
    out = gs.Variable(fresh(f"{const.name}_dq"), dtype=np.float32)
    attrs = {} if per_tensor else {"axis": int(stored_axis)}
    graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{const.name}_DequantizeLinear"),
                               attrs, [qc, sc, zc], [out]))
    g.inputs[slot] = out


def scale_value(graph: gs.Graph, fresh: Namer, value: str, scale: np.ndarray,
                users: tuple[str, ...]) -> None:
    tensors = graph.tensors()
    if value not in tensors or isinstance(tensors[value], gs.Constant):
        raise ValueError(f"ScaleValue: '{value}' is not an activation of the graph")
    x = tensors[value]
    readers = [n for n in list(x.outputs) if not users or n.name in users]
    if not readers:
        return
    factor = gs.Constant(fresh(f"{value}_smooth"), np.asarray(scale, np.float32).reshape(-1))
    y = gs.Variable(fresh(f"{value}_smoothed"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", fresh(f"{value}_Mul"), {}, [x, factor], [y]))
    for reader in readers:
        for j, t in enumerate(reader.inputs):
            if t is x:
                reader.inputs[j] = y


def fuse_activation(graph: gs.Graph, fresh: Namer, by_name: dict, fn: str,
                    names: tuple[str, ...]) -> None:
    if fn != "silu":
        raise ValueError(f"the ONNX frontend cannot fuse activation '{fn}'")
    chain = [by_name[n] for n in names]
    x, out = chain[0].inputs[0], chain[-1].outputs[0]
    for g in chain:
        g.inputs.clear()
        g.outputs.clear()
    graph.nodes.append(gs.Node("QuickGelu", fresh(f"{names[-1]}_silu"), {"alpha": 1.0}, [x],
                               [out], domain=MS_DOMAIN))


MS_DOMAIN = "com.microsoft"


def declare_domains(model: onnx.ModelProto) -> None:
    """Add the opset import of ONNX Runtime's contrib domain where a node uses it."""
    have = {o.domain for o in model.opset_import}
    if MS_DOMAIN not in have and any(n.domain == MS_DOMAIN for n in model.graph.node):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
