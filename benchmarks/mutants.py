"""Seeded mutations of real ONNX files: the bad input a user's tool chain produces (truncated
downloads, flipped bytes, edits by hand or by another tool). Shared by the fuzz test and the
robustness matrix. Each mutation returns (name, bytes); what it makes may still be valid."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def truncate(raw: bytes, rng) -> bytes:
    return raw[:int(rng.integers(1, max(2, len(raw))))]


def flip_bytes(raw: bytes, rng) -> bytes:
    buf = bytearray(raw)
    for i in rng.integers(0, len(buf), size=int(rng.integers(1, 8))):
        buf[int(i)] ^= int(rng.integers(1, 256))
    return bytes(buf)


def drop_node(m: onnx.ModelProto, rng) -> bytes:
    del m.graph.node[int(rng.integers(len(m.graph.node)))]
    return _bytes(m)


def drop_initializer(m: onnx.ModelProto, rng) -> bytes:
    if m.graph.initializer:
        del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
    return _bytes(m)


def reshape_initializer(m: onnx.ModelProto, rng) -> bytes:
    """A weight of another shape (a shape mismatch the graph does not declare)."""
    if m.graph.initializer:
        i = int(rng.integers(len(m.graph.initializer)))
        arr = numpy_helper.to_array(m.graph.initializer[i])
        if arr.size > 1:
            new = np.resize(arr, (max(1, arr.size // 2),)).astype(arr.dtype)
            name = m.graph.initializer[i].name
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, name))
    return _bytes(m)


def nan_weights(m: onnx.ModelProto, rng) -> bytes:
    """A weight containing NaN / Inf (a diverged training run)."""
    floats = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    if floats:
        t = _pick(rng, floats)
        arr = numpy_helper.to_array(t).copy()
        arr.flat[int(rng.integers(arr.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return _bytes(m)


def set_attribute(m: onnx.ModelProto, rng) -> bytes:
    """A conv / pool attribute changed: group, strides, pads, auto_pad, dilations."""
    nodes = [n for n in m.graph.node if n.op_type in ("Conv", "MaxPool", "AveragePool", "Gemm")]
    if not nodes:
        return _bytes(m)
    n = _pick(rng, nodes)
    choice = int(rng.integers(6))
    keep = [a for a in n.attribute if a.name not in ("group", "strides", "pads", "auto_pad",
                                                       "dilations", "transB")]
    changed = {a.name: a for a in n.attribute}
    if choice == 0:
        changed["group"] = helper.make_attribute("group", int(rng.integers(1, 5)))
    elif choice == 1:
        changed["strides"] = helper.make_attribute("strides", [2, 2])
    elif choice == 2:
        changed.pop("pads", None)
        changed["auto_pad"] = helper.make_attribute(
            "auto_pad", _pick(rng, ["SAME_UPPER", "SAME_LOWER", "VALID"]))
    elif choice == 3:
        changed["pads"] = helper.make_attribute("pads", [int(x) for x in rng.integers(0, 3, 4)])
    elif choice == 4:
        changed["dilations"] = helper.make_attribute("dilations", [2, 2])
    else:
        changed["transB"] = helper.make_attribute("transB", int(rng.integers(2)))
    del n.attribute[:]
    n.attribute.extend(keep + [a for k, a in changed.items()
                               if k in ("group", "strides", "pads", "auto_pad", "dilations",
                                        "transB")])
    return _bytes(m)


def unknown_op(m: onnx.ModelProto, rng) -> bytes:
    n = _pick(rng, list(m.graph.node))
    n.op_type = _pick(rng, ["NoSuchOp", "Relu", "Identity", "Sigmoid"])
    return _bytes(m)


def rewire(m: onnx.ModelProto, rng) -> bytes:
    """A node input pointed at another value (or at nothing)."""
    n = _pick(rng, list(m.graph.node))
    if n.input:
        values = [o for x in m.graph.node for o in x.output] + [i.name for i in m.graph.input]
        n.input[int(rng.integers(len(n.input)))] = _pick(rng, values + ["missing_value"])
    return _bytes(m)


def input_dims(m: onnx.ModelProto, rng) -> bytes:
    """Graph input dims changed: dynamic, negative, zero, or another size."""
    inp = m.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if dims:
        d = dims[int(rng.integers(len(dims)))]
        choice = int(rng.integers(4))
        if choice == 0:
            d.dim_param = "dyn"
        else:
            d.dim_value = [-1, 0, 7][choice - 1]
    return _bytes(m)


def opset(m: onnx.ModelProto, rng) -> bytes:
    m.opset_import[0].version = int(_pick(rng, [7, 9, 11, 12, 99]))
    return _bytes(m)


RAW = {"truncate": truncate, "flip-bytes": flip_bytes}
PROTO = {"drop-node": drop_node, "drop-initializer": drop_initializer,
         "reshape-initializer": reshape_initializer, "nan-weights": nan_weights,
         "set-attribute": set_attribute, "unknown-op": unknown_op, "rewire": rewire,
         "input-dims": input_dims, "opset": opset}
KINDS = tuple(RAW) + tuple(PROTO)


def mutate(raw: bytes, kind: str, seed: int) -> bytes:
    """One seeded mutant of the serialized model `raw`."""
    rng = np.random.default_rng(seed)
    if kind in RAW:
        return RAW[kind](raw, rng)
    model = onnx.ModelProto()
    model.ParseFromString(raw)
    return PROTO[kind](model, rng)
