"""torch op tables for the fx frontend: module types and functions -> OpKind, parameter roles,
the normalized attributes passes read, and building nn layers from edit-vocabulary Layers."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from graphslim.edits import Layer
from graphslim.frontends.fx_modules import LinearAsConv, PointwiseMatMul, SlimMultiheadAttention
from graphslim.ir import OpKind

MODULE_KINDS: list[tuple[type, OpKind]] = [
    (nn.modules.conv._ConvTransposeNd, OpKind.CONV_TRANSPOSE),
    (nn.modules.conv._ConvNd, OpKind.CONV),
    (nn.Linear, OpKind.LINEAR),
    (nn.modules.batchnorm._BatchNorm, OpKind.BATCHNORM),
    (nn.LayerNorm, OpKind.LAYERNORM), (nn.GroupNorm, OpKind.GROUPNORM),
    (nn.modules.instancenorm._InstanceNorm, OpKind.INSTANCENORM),
    (nn.MultiheadAttention, OpKind.ATTENTION), (SlimMultiheadAttention, OpKind.ATTENTION),
    (nn.modules.pooling._AvgPoolNd, OpKind.POOL_AVG),
    (nn.modules.pooling._MaxPoolNd, OpKind.POOL_MAX),
    (nn.modules.pooling._AdaptiveAvgPoolNd, OpKind.POOL_AVG),
    (nn.modules.pooling._AdaptiveMaxPoolNd, OpKind.POOL_MAX),
    (nn.Flatten, OpKind.FLATTEN), (nn.Softmax, OpKind.SOFTMAX),
    (nn.Identity, OpKind.IDENTITY), (nn.modules.dropout._DropoutNd, OpKind.IDENTITY),
    (nn.ReLU, OpKind.ACTIVATION), (nn.ReLU6, OpKind.ACTIVATION), (nn.SiLU, OpKind.ACTIVATION),
    (nn.GELU, OpKind.ACTIVATION), (nn.Hardswish, OpKind.ACTIVATION),
    (nn.Hardsigmoid, OpKind.ACTIVATION), (nn.Sigmoid, OpKind.ACTIVATION),
    (nn.Tanh, OpKind.ACTIVATION), (nn.LeakyReLU, OpKind.ACTIVATION), (nn.ELU, OpKind.ACTIVATION),
    (nn.Mish, OpKind.ACTIVATION), (nn.PReLU, OpKind.ACTIVATION), (nn.Hardtanh, OpKind.ACTIVATION),
]
LEAF_TYPES = tuple(t for t, _ in MODULE_KINDS)
FUNCTION_KINDS = {
    "add": OpKind.ADD, "iadd": OpKind.ADD, "sub": OpKind.SUB, "mul": OpKind.MUL,
    "imul": OpKind.MUL, "truediv": OpKind.DIV, "div": OpKind.DIV, "cat": OpKind.CONCAT,
    "concat": OpKind.CONCAT, "flatten": OpKind.FLATTEN, "reshape": OpKind.RESHAPE,
    "view": OpKind.RESHAPE, "permute": OpKind.TRANSPOSE, "transpose": OpKind.TRANSPOSE,
    "relu": OpKind.ACTIVATION, "relu6": OpKind.ACTIVATION, "silu": OpKind.ACTIVATION,
    "gelu": OpKind.ACTIVATION, "hardswish": OpKind.ACTIVATION, "hardsigmoid": OpKind.ACTIVATION,
    "sigmoid": OpKind.ACTIVATION, "tanh": OpKind.ACTIVATION, "softmax": OpKind.SOFTMAX,
    "adaptive_avg_pool2d": OpKind.POOL_GLOBAL_AVG, "avg_pool2d": OpKind.POOL_AVG,
    "max_pool2d": OpKind.POOL_MAX, "dropout": OpKind.IDENTITY, "contiguous": OpKind.IDENTITY,
    "matmul": OpKind.MATMUL, "bmm": OpKind.MATMUL, "layer_norm": OpKind.LAYERNORM,
    "mean": OpKind.REDUCE, "chunk": OpKind.SPLIT, "split": OpKind.SPLIT,
    "getitem": OpKind.SLICE, "size": OpKind.SHAPE, "getattr": OpKind.SHAPE, "dim": OpKind.SHAPE,
    "pad": OpKind.PAD,
    "interpolate": OpKind.RESIZE, "linear": OpKind.MATMUL, "einsum": OpKind.MATMUL,
    "stochastic_depth": OpKind.ELEMENTWISE, "unflatten": OpKind.RESHAPE,
    "squeeze": OpKind.RESHAPE, "unsqueeze": OpKind.RESHAPE, "expand": OpKind.EXPAND,
}
ROLE_ATTRS = {
    OpKind.BATCHNORM: {"scale": "weight", "bias": "bias", "mean": "running_mean",
                       "var": "running_var"},
    OpKind.LAYERNORM: {"scale": "weight", "bias": "bias"},
    OpKind.GROUPNORM: {"scale": "weight", "bias": "bias"},
}


def literal(a):
    """An fx argument as plain data: nodes become "$node", slices ("slice", start, stop, step)."""
    if isinstance(a, fx.Node):
        return "$node"
    if isinstance(a, slice):
        return ("slice", literal(a.start), literal(a.stop), literal(a.step))
    if isinstance(a, (list, tuple)):
        return type(a)(literal(x) for x in a)
    if a is None or a is Ellipsis or isinstance(a, (int, float, str, bool)):
        return a
    return str(a)


def function_attrs(n: fx.Node, kind: OpKind, fn: str) -> dict:
    """The typed attributes of a call_function node (graphslim.ir's vocabulary), read from its
    literal arguments here so no pass or analysis reads fx call arguments."""
    args = literal(tuple(n.args[1:]))
    kw = {k: literal(v) for k, v in n.kwargs.items()}

    def arg(i, name, default=None):
        return kw.get(name, args[i] if len(args) > i else default)

    if kind is OpKind.SPLIT:
        size = arg(0, "split_size_or_sections" if fn == "split" else "chunks")
        attrs = {"axis": arg(1, "dim", 0)}
        if fn == "chunk" and isinstance(size, int):
            attrs["chunks"] = size
        elif isinstance(size, int):
            attrs["split_size"] = size
        elif isinstance(size, (list, tuple)) and all(isinstance(x, int) for x in size):
            attrs["sizes"] = tuple(size)
        return attrs
    if kind is OpKind.CONCAT:
        return {"axis": arg(0, "dim", 0)}
    if kind is OpKind.FLATTEN:
        return {"axis": arg(0, "start_dim", 0)}
    if kind is OpKind.MATMUL:
        if isinstance(n.args[0], str):
            return {"form": "einsum", "equation": n.args[0]}
        return {"form": "linear" if fn == "linear" else "matmul"}
    if kind is OpKind.SLICE:  # x[index]
        return {"form": "index", "index": args[0] if args else None}
    if kind is OpKind.RESHAPE:
        return {"form": {"view": "target", "reshape": "target", "squeeze": "squeeze",
                         "unsqueeze": "unsqueeze"}.get(fn, "fixed")}
    if kind is OpKind.TRANSPOSE:
        if fn == "transpose":
            return {"swap": tuple(args[:2])}
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return {"perm": tuple(dims) if dims else None}
    if kind is OpKind.REDUCE:
        dims = arg(0, "dim")
        return {"axes": dims if dims is None or isinstance(dims, int) else tuple(dims),
                "keepdims": bool(arg(1, "keepdim", False))}
    if kind is OpKind.SOFTMAX:
        return {"axis": arg(0, "dim", -1)}
    if kind is OpKind.SHAPE:
        return {"form": "shape"}
    return {}


def make_layer(layer: Layer, like: nn.Module) -> nn.Module:
    """An nn.Conv*/nn.Linear holding `layer`'s weights (padding mode inherited from `like`)."""
    w = torch.as_tensor(np.ascontiguousarray(layer.weight), dtype=torch.float32)
    b = None if layer.bias is None else torch.as_tensor(np.ascontiguousarray(layer.bias),
                                                        dtype=torch.float32)
    if layer.form in ("matmul", "gemm"):
        mod = PointwiseMatMul(w.shape[1], w.shape[0], 1, bias=b is not None)
    elif layer.kind is OpKind.LINEAR:
        cls = LinearAsConv if layer.form == "conv" else nn.Linear
        mod = cls(w.shape[1], w.shape[0], bias=b is not None)
    else:
        nd = w.ndim - 2
        pads = tuple(layer.pads or (0,) * 2 * nd)
        if pads[:nd] != pads[nd:]:
            raise ValueError(f"asymmetric padding {pads} cannot be expressed by nn.Conv{nd}d")
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        mode = getattr(like, "padding_mode", "zeros") if any(pads) else "zeros"
        mod = cls(w.shape[1] * layer.groups, w.shape[0], tuple(w.shape[2:]),
                  stride=tuple(layer.strides or (1,) * nd), padding=pads[:nd],
                  dilation=tuple(layer.dilations or (1,) * nd), groups=layer.groups,
                  bias=b is not None, padding_mode=mode)
    with torch.no_grad():
        mod.weight.copy_(w)
        if b is not None:
            mod.bias.copy_(b)
    return mod


def op_name(n: fx.Node) -> str:
    if n.op == "call_module":
        return type(n.graph.owning_module.get_submodule(n.target)).__name__
    if n.op == "get_attr":
        return "get_attr"
    return getattr(n.target, "__name__", str(n.target))


def _pair(v, nd: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def module_attrs(mod: nn.Module, kind: OpKind) -> dict:
    if kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE):
        nd = len(mod.kernel_size)
        if isinstance(mod.padding, str):
            pads = (0,) * 2 * nd if mod.padding == "valid" else None
        else:
            pads = tuple(mod.padding) * 2
        attrs = {"groups": mod.groups, "kernel_shape": tuple(mod.kernel_size),
                 "strides": tuple(mod.stride), "dilations": tuple(mod.dilation), "pads": pads,
                 "padding_mode": getattr(mod, "padding_mode", "zeros")}
        if kind is OpKind.CONV_TRANSPOSE:
            attrs["output_padding"] = tuple(mod.output_padding)
        if isinstance(mod, PointwiseMatMul):
            attrs["form"] = "matmul"  # graphslim.edits.Layer.form: the op that computes it
        return attrs
    if kind is OpKind.LINEAR and isinstance(mod, LinearAsConv):
        return {"form": "conv"}
    if kind is OpKind.BATCHNORM:
        training = mod.training or not mod.track_running_stats or mod.running_mean is None
        return {"eps": float(mod.eps), "training": bool(training)}
    if kind in (OpKind.POOL_AVG, OpKind.POOL_MAX) and not hasattr(mod, "kernel_size"):
        return {"adaptive": True, "output_size": mod.output_size}
    if kind is OpKind.POOL_AVG:
        nd = 2
        return {"kernel_shape": _pair(mod.kernel_size, nd), "strides": _pair(mod.stride, nd),
                "pads": _pair(mod.padding, nd) * 2,
                "count_include_pad": int(getattr(mod, "count_include_pad", True)),
                "divisor_override": getattr(mod, "divisor_override", None)}
    if kind is OpKind.ATTENTION:
        inner = mod.in_proj_weight.shape[0] // 3 if mod.in_proj_weight is not None else \
            mod.embed_dim
        return {"embed_dim": mod.embed_dim, "num_heads": mod.num_heads,
                "kdim": getattr(mod, "kdim", mod.embed_dim),
                "vdim": getattr(mod, "vdim", mod.embed_dim), "batch_first": mod.batch_first,
                "inner_dim": inner, "out_dim": mod.out_proj.out_features,
                "packed": mod.in_proj_weight is not None and mod.bias_k is None
                if isinstance(mod, nn.MultiheadAttention) else True}
    if kind is OpKind.ACTIVATION:
        return {"fn": type(mod).__name__.lower()}
    if kind is OpKind.LAYERNORM:  # torchvision's LayerNorm2d normalizes NCHW over channels
        return {"normalized_ndim": len(mod.normalized_shape),
                "channels_first": type(mod).__name__ == "LayerNorm2d"}
    if kind is OpKind.GROUPNORM:
        return {"num_groups": mod.num_groups}
    if kind is OpKind.SOFTMAX:
        return {"axis": mod.dim}  # None: torch's legacy implicit dim (rules treat it as unknown)
    if kind is OpKind.FLATTEN:
        return {"axis": mod.start_dim}
    return {}
