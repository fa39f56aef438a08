"""The read-only graph view every pass sees, whatever the frontend.

A frontend (torch.fx or ONNX) maps its ops onto the closed `OpKind` vocabulary and its tensors onto
named values.  Parameters are addressed by (node, role) and returned in one canonical layout per
kind, so a pass never needs to know how a backend stores a weight:

- CONV:            weight (out, in/groups, *kernel), bias (out,)
- CONV_TRANSPOSE:  weight (in, out/groups, *kernel), bias (out,)
- LINEAR:          weight (out, in), bias (out,)      (nn.Linear, Gemm either transB, MatMul x @ W)
- BATCHNORM:       scale, bias, mean, var (C,)        (a missing affine reads as ones / zeros)
- anything else:   role "in<i>" for a constant in input slot i, "value" for an fx get_attr

Typed attributes, filled by both frontends (passes and analyses read these, never `Node.op` or
fx call arguments; `op` is the frontend's spelling, for messages only):

- CONV / CONV_TRANSPOSE: groups, kernel_shape, strides, dilations, pads (begins then ends, with
  ONNX auto_pad resolved; None where they depend on the input size), padding_mode
- POOL_AVG / POOL_MAX: kernel_shape, strides, pads (as for conv), count_include_pad, adaptive
- ACTIVATION / ELEMENTWISE: fn, one lower-case vocabulary ("relu", "relu6", "clip",
  "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "sqrt", "cast", ...); a cast has
  to_float (bool)
- CONCAT / SPLIT / FLATTEN / GATHER / SOFTMAX: axis; SPLIT: chunks | split_size | sizes (fx;
  ONNX splits have one output per piece)
- SLICE: form "range" (bounds in params in1..in4: starts, ends, axes, steps) or "index"
  (index: a Python-style index, slices as ("slice", start, stop, step), "$node" for a run-time
  value)
- GATHER: axis; indices in param in1 where constant
- RESHAPE: form "target" (a literal target shape that pruning rewrites), "squeeze",
  "unsqueeze" or "fixed" (sizes graphslim does not rewrite)
- TRANSPOSE: perm (None: reversed) or swap (two axes exchanged)
- REDUCE: axes (None: all; ONNX opset 18 puts them in param in1), keepdims
- SHAPE: form "shape" (reads a size) or "other"
- MATMUL: form "matmul" | "linear" (functional linear) | "einsum" (with equation)
- nodes calling one fx module: module (its path; weights shared between such nodes)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class OpKind(enum.Enum):
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    LINEAR = "linear"
    MATMUL = "matmul"
    ATTENTION = "attention"
    BATCHNORM = "batchnorm"
    LAYERNORM = "layernorm"
    GROUPNORM = "groupnorm"
    INSTANCENORM = "instancenorm"
    ACTIVATION = "activation"
    ELEMENTWISE = "elementwise"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    CONCAT = "concat"
    SPLIT = "split"
    SLICE = "slice"
    POOL_AVG = "pool_avg"
    POOL_MAX = "pool_max"
    POOL_GLOBAL_AVG = "pool_global_avg"
    POOL_GLOBAL_MAX = "pool_global_max"
    FLATTEN = "flatten"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    PAD = "pad"
    RESIZE = "resize"
    REDUCE = "reduce"
    SOFTMAX = "softmax"
    IDENTITY = "identity"
    CONSTANT = "constant"
    SHAPE = "shape"
    GATHER = "gather"
    QUANTIZE = "quantize"
    DEQUANTIZE = "dequantize"
    EXPAND = "expand"
    OPAQUE = "opaque"


#: kinds that hold a weight a per-output-channel affine can be folded into
WEIGHTED = frozenset({OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.LINEAR})


@dataclass(frozen=True)
class Node:
    """One operation. `inputs`/`outputs` name activation values; constants are in `params`."""

    name: str
    kind: OpKind
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: Mapping[str, str] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.outputs[0]

    def describe(self) -> str:
        """'name (op)' for messages: the frontend's spelling shown, never compared."""
        return f"{self.name} ({self.op})"


def conv_geometry(node: Node) -> tuple[tuple, tuple, tuple]:
    """(strides, pads, dilations) of a CONV node, pads in ONNX order (begins, then ends)."""
    a = node.attrs
    return tuple(a["strides"]), tuple(a["pads"]), tuple(a["dilations"])


class GraphView:
    """Topologically ordered nodes plus the lookups passes need.

    Frontends build it and supply `_read_param(node, role)`; it is never edited in place: a frontend
    makes a fresh view after every change.
    """

    frontend: str = "?"
    #: True where slicing a parameter read by several nodes gives the edited node a private copy
    #: (ONNX constants); False where the nodes share one tensor that is sliced for all (fx)
    private_param_copies: bool = False
    #: activations (edits.FuseActivation `fn`) this frontend can turn a node chain into
    fused_activations: frozenset[str] = frozenset()

    def __init__(self, nodes: list[Node], inputs: list[str], outputs: list[str],
                 param_users: Mapping[str, tuple[str, ...]]):
        self._nodes = list(nodes)
        self._by_name = {n.name: n for n in self._nodes}
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._param_users = dict(param_users)
        self._producer: dict[str, Node] = {}
        self._users: dict[str, list[Node]] = {}
        for n in self._nodes:
            for v in n.outputs:
                self._producer[v] = n
            for v in n.inputs:
                self._users.setdefault(v, []).append(n)

    # --- structure -------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no node named '{name}' in the graph") from None

    def producer(self, value: str) -> Node | None:
        return self._producer.get(value)

    def users(self, value: str) -> list[Node]:
        return list(self._users.get(value, ()))

    def is_graph_output(self, value: str) -> bool:
        return value in self.outputs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    # --- parameters ------------------------------------------------------------------------
    def has_param(self, node: str, role: str) -> bool:
        return role in self.node(node).params

    def param(self, node: str, role: str) -> np.ndarray:
        """A copy of the parameter in the canonical layout of the node's kind (see module doc)."""
        n = self.node(node)
        if role not in n.params:
            raise KeyError(f"node '{node}' has no parameter '{role}'")
        return np.array(self._read_param(n, role), copy=True)

    def param_info(self, node: str, role: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape in canonical layout, dtype) without reading the data."""
        n = self.node(node)
        shape, dtype = self._param_info(n, role)
        if n.kind is OpKind.LINEAR and role == "weight" and n.attrs.get("layout") == "in_out":
            shape = tuple(reversed(shape))
        if n.kind is OpKind.LINEAR and role == "bias":
            shape = (int(np.prod(shape)),)
        return tuple(shape), np.dtype(dtype)

    def param_users(self, node: str, role: str) -> tuple[str, ...]:
        """Names of every node that reads the same stored tensor (tied / shared weights)."""
        return self._param_users.get(self.node(node).params[role], (node,))

    def _read_param(self, node: Node, role: str) -> np.ndarray:
        raise NotImplementedError

    def _param_info(self, node: Node, role: str) -> tuple[tuple[int, ...], np.dtype]:
        raise NotImplementedError
