"""ONNX op tables for the ONNX frontend: op_type -> OpKind, parameter roles by input slot, and
the normalized attributes passes read."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphslim.ir import OpKind

SIMPLE_KINDS = {
    "BatchNormalization": OpKind.BATCHNORM, "LayerNormalization": OpKind.LAYERNORM,
    "GroupNormalization": OpKind.GROUPNORM, "InstanceNormalization": OpKind.INSTANCENORM,
    "Add": OpKind.ADD, "Sub": OpKind.SUB, "Mul": OpKind.MUL, "Div": OpKind.DIV,
    "Concat": OpKind.CONCAT, "Split": OpKind.SPLIT, "Slice": OpKind.SLICE,
    "AveragePool": OpKind.POOL_AVG, "MaxPool": OpKind.POOL_MAX,
    "GlobalAveragePool": OpKind.POOL_GLOBAL_AVG, "GlobalMaxPool": OpKind.POOL_GLOBAL_MAX,
    "Flatten": OpKind.FLATTEN, "Reshape": OpKind.RESHAPE, "Squeeze": OpKind.RESHAPE,
    "Unsqueeze": OpKind.RESHAPE, "Transpose": OpKind.TRANSPOSE, "Pad": OpKind.PAD,
    "Resize": OpKind.RESIZE, "Upsample": OpKind.RESIZE, "Softmax": OpKind.SOFTMAX,
    "Identity": OpKind.IDENTITY, "Dropout": OpKind.IDENTITY,
    "ReduceMean": OpKind.REDUCE, "ReduceSum": OpKind.REDUCE, "ReduceMax": OpKind.REDUCE,
    "Shape": OpKind.SHAPE, "Gather": OpKind.GATHER, "ConstantOfShape": OpKind.SHAPE,
    "Expand": OpKind.EXPAND, "QuantizeLinear": OpKind.QUANTIZE,
    "DequantizeLinear": OpKind.DEQUANTIZE,
    "Constant": OpKind.CONSTANT, "Einsum": OpKind.MATMUL,
}
ACTIVATIONS = {"Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu",
                "Gelu", "Clip", "Softplus", "Mish", "PRelu", "Celu", "ThresholdedRelu", "Swish",
               "QuickGelu"}
ELEMENTWISE = {"Erf", "Sqrt", "Pow", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Cast", "Floor",
                "Ceil", "Round", "Sin", "Cos", "Where", "Max", "Min", "Equal", "Not"}
#: ONNX op -> the IR's activation vocabulary where the names differ beyond case
_FN = {"Swish": "silu"}
#: the IR's `form` of ops whose kind has several (see graphslim.ir)
_FORMS = {"Slice": "range", "Reshape": "target", "Squeeze": "squeeze", "Unsqueeze": "unsqueeze",
          "Shape": "shape", "ConstantOfShape": "other"}
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)
ROLES = {
    "Conv": ("x", "weight", "bias"), "ConvTranspose": ("x", "weight", "bias"),
    "Gemm": ("x", "weight", "bias"), "MatMul": ("x", "weight"),
    "BatchNormalization": ("x", "scale", "bias", "mean", "var"),
    "LayerNormalization": ("x", "scale", "bias"), "InstanceNormalization": ("x", "scale", "bias"),
    "GroupNormalization": ("x", "scale", "bias"),
    "QuantizeLinear": ("x", "scale", "zero_point"),
    "DequantizeLinear": ("x", "scale", "zero_point"),
}


def role(op: str, slot: int) -> str:
    roles = ROLES.get(op, ())
    return roles[slot] if slot < len(roles) else f"in{slot}"


def slot(op: str, role: str) -> int:
    roles = ROLES.get(op, ())
    if role in roles:
        return roles.index(role)
    if role.startswith("in") and role[2:].isdigit():
        return int(role[2:])
    raise KeyError(f"op {op} has no parameter role '{role}'")


def np_dtype(t) -> np.dtype:
    if isinstance(t, gs.Constant):
        return np.dtype(t.dtype) if not isinstance(t.dtype, int) else \
            onnx.helper.tensor_dtype_to_np_dtype(t.dtype)
    if t.dtype is None:
        return np.dtype(np.float32)
    if isinstance(t.dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(t.dtype)
    return np.dtype(t.dtype)


def constant_node_values(node: gs.Node) -> np.ndarray | None:
    a = node.attrs
    if "value" in a:
        return np.asarray(a["value"].values)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dtype)
    return None  # sparse or string constants stay as nodes


def _auto_pad(a) -> str:
    v = a.get("auto_pad", "NOTSET")
    return v.decode() if isinstance(v, bytes) else str(v)


def explicit_pads(a, kernel: tuple) -> tuple[int, ...] | None:
    """A conv's or pool's pads (begins, then ends) with `auto_pad` resolved; None where they
    depend on the input size (SAME with a stride > 1): passes treat None as 'pads unknown,
    maybe nonzero'. SAME at stride 1 pads d*(k-1) in total whatever the size, the odd one at
    the end (SAME_UPPER) or the beginning (SAME_LOWER)."""
    nd = len(kernel)
    mode = _auto_pad(a)
    if mode == "NOTSET":
        return tuple(int(p) for p in a.get("pads", [0] * 2 * nd))
    if mode == "VALID":
        return (0,) * 2 * nd
    if any(int(st) != 1 for st in a.get("strides", [1] * nd)):
        return None
    dil = a.get("dilations", [1] * nd)
    total = [int(d) * (int(k) - 1) for d, k in zip(dil, kernel)]
    small = [t // 2 for t in total]
    big = [t - t // 2 for t in total]
    return tuple(small + big) if mode == "SAME_UPPER" else tuple(big + small)


def classify(g: gs.Node, params: dict[str, str]) -> tuple[OpKind, dict]:
    op, a = g.op, g.attrs
    if op in ("Conv", "ConvTranspose") and "weight" in params:
        w_shape = tuple(g.inputs[1].shape)
        nd = len(w_shape) - 2
        attrs = {
            "groups": int(a.get("group", 1)), "kernel_shape": w_shape[2:],
            "strides": tuple(a.get("strides", [1] * nd)),
            "dilations": tuple(a.get("dilations", [1] * nd)),
            "pads": None if op == "ConvTranspose" and _auto_pad(a) not in ("NOTSET", "VALID")
            else explicit_pads(a, w_shape[2:]),
            "padding_mode": "zeros",
        }
        if op == "ConvTranspose":
            attrs["output_padding"] = tuple(a.get("output_padding", [0] * nd))
            return OpKind.CONV_TRANSPOSE, attrs
        return OpKind.CONV, attrs
    if op == "Gemm":
        w = g.inputs[1] if len(g.inputs) > 1 else None
        linear = (isinstance(w, gs.Constant) and len(w.shape) == 2 and not a.get("transA", 0)
                  and float(a.get("alpha", 1.0)) == 1.0 and
                  (len(g.inputs) < 3 or (float(a.get("beta", 1.0)) == 1.0 and
                                         isinstance(g.inputs[2], gs.Constant))))
        if linear:
            out_features = w.shape[0] if a.get("transB", 0) else w.shape[1]
            if len(g.inputs) < 3 or int(np.prod(g.inputs[2].shape)) == out_features:
                return OpKind.LINEAR, {"layout": "out_in" if a.get("transB", 0) else "in_out"}
        return OpKind.OPAQUE, {"reason": "Gemm with transA, alpha/beta != 1 or a full C matrix"}
    if op == "MatMul":
        w = g.inputs[1]
        if isinstance(w, gs.Constant) and len(w.shape) == 2 and not isinstance(g.inputs[0],
                                                                               gs.Constant):
            return OpKind.LINEAR, {"layout": "in_out"}
        return OpKind.MATMUL, {}
    if op == "BatchNormalization":
        training = bool(a.get("training_mode", 0)) or len(g.outputs) > 1
        return OpKind.BATCHNORM, {"eps": float(a.get("epsilon", 1e-5)), "training": training}
    if op in SIMPLE_KINDS:
        attrs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in a.items()
                 if isinstance(v, (int, float, str, list)) and k != "auto_pad"}
        if op in ("AveragePool", "MaxPool") and "kernel_shape" in a:
            attrs["pads"] = explicit_pads(a, tuple(a["kernel_shape"]))
        if op in _FORMS:
            attrs["form"] = _FORMS[op]
        if op == "Transpose":
            attrs.setdefault("perm", None)
        if op.startswith("Reduce"):
            attrs["keepdims"] = bool(a.get("keepdims", 1))
        return SIMPLE_KINDS[op], attrs
    if op in ACTIVATIONS:
        return OpKind.ACTIVATION, {"fn": _FN.get(op, op.lower())}
    if op in ELEMENTWISE:
        attrs = {"fn": op.lower()}
        if op == "Cast":
            attrs["to_float"] = int(a.get("to", 0)) in _FLOAT_TYPES
        return OpKind.ELEMENTWISE, attrs
    return OpKind.OPAQUE, {"reason": f"op {op} is not modelled by graphslim"}


def outer_reads(node: gs.Node) -> list[str]:
    """Names of outer-scope variables read inside the node's subgraphs (nested ones too)."""
    found: list[str] = []
    for sub in node.subgraphs() if hasattr(node, "subgraphs") else ():
        local = {t.name for t in sub.inputs} | {o.name for n in sub.nodes for o in n.outputs}
        for n in sub.nodes:
            reads = [t.name for t in n.inputs if isinstance(t, gs.Variable)]
            for name in [*reads, *outer_reads(n)]:
                if name and name not in local and name not in found:
                    found.append(name)
    return found
