"""The edit vocabulary: what a plan may ask a frontend to do.

Each frontend implements every edit once (graphslim/frontends/*).  Arrays are in the canonical
layout of graphslim.ir; the frontend converts to its own storage layout and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.ir import OpKind


@dataclass(frozen=True, eq=False)
class SetParam:
    """Give `node` a new value for parameter `role` (creating it, e.g. a bias, if absent).

    If the stored tensor is shared with other nodes, only `node` gets the new value: the frontend
    writes a private copy and the shared original stays as it was for the others.
    """

    node: str
    role: str
    value: np.ndarray


@dataclass(frozen=True)
class Bypass:
    """Remove a one-input, one-output node: whoever read its output reads its input instead.
    With `keep` (a value the node reads), a node of several inputs: its readers read `keep`,
    and what only the node fed (a residual branch) is removed with it."""

    node: str
    keep: str | None = None


@dataclass(frozen=True, eq=False)
class Layer:
    """A new CONV or LINEAR layer for ReplaceWithChain, weights in canonical layout.

    `strides`, `pads` (ONNX order: all begins, then all ends) and `dilations` default to 1, 0, 1.
    `form` picks the op that computes it, same function and weights: "" the layer's own op;
    "matmul" a pointwise 2-D CONV (1x1, stride 1, no padding, groups 1) as a MatMul over the
    flattened pixels, W (O, C) @ x (N, C, H*W); "gemm" the same conv on a 1x1-pixel input as a
    Gemm on (N, C); "conv" a LINEAR on (N, C) as a 1x1 conv on (N, C, 1, 1).
    """

    kind: OpKind
    weight: np.ndarray
    bias: np.ndarray | None = None
    groups: int = 1
    strides: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    form: str = ""

    def __post_init__(self):
        if self.kind not in (OpKind.CONV, OpKind.LINEAR):
            raise ValueError(f"a chain layer is CONV or LINEAR, not {self.kind}")
        if self.form in ("matmul", "gemm") and not (
                self.kind is OpKind.CONV and self.weight.ndim == 4 and self.groups == 1
                and self.weight.shape[2:] == (1, 1) and not any(self.pads or ())
                and all(s == 1 for s in self.strides or ())):
            raise ValueError(f"form '{self.form}' needs a 1x1 2-D conv with stride 1, no "
                             "padding and one group")
        if self.form == "conv" and self.kind is not OpKind.LINEAR or \
                self.form not in ("", "matmul", "gemm", "conv"):
            raise ValueError(f"form '{self.form}' does not apply to a {self.kind.value} layer")


@dataclass(frozen=True, eq=False)
class ReplaceWithChain:
    """Replace a CONV or LINEAR node by layers applied in sequence (same input, same output
    value, no nonlinearity between): low-rank factorizations and conv substitutions."""

    node: str
    layers: tuple[Layer, ...]


@dataclass(frozen=True, eq=False)
class ReplaceSubgraph:
    """Replace the nodes `nodes` (the last one's output is the result; each one's output read
    only inside the set) by `layers` applied in sequence to value `source`: e.g. the Reshape,
    MatMul, Add, Reshape a converter writes for a 1x1 conv become one Conv. `node` names the
    first for error messages. Nodes that only computed shapes or constants for the set are
    left for dead-code removal."""

    node: str
    nodes: tuple[str, ...]
    source: str
    layers: tuple[Layer, ...]


@dataclass(frozen=True, eq=False)
class SliceParam:
    """Keep only positions `keep` of parameter `role` of `node` along `axis` (canonical layout),
    in that order: ascending to prune, a permutation to reorder channels. On fx the module's own
    tensor is sliced (a module called twice shares it); on ONNX a constant shared with other
    nodes is copied for this node first (GraphView's `private_param_copies` tells which). The
    frontend updates layer metadata (channel counts) so the layer describes its new weights."""

    node: str
    role: str
    axis: int
    keep: np.ndarray


@dataclass(frozen=True)
class SetAttr:
    """Change a structural attribute of `node`. Names: "groups" (conv), "num_groups"
    (GroupNorm), "shape" ({output axis: new size} for a Reshape / view target), "split"
    (tuple of piece sizes of a Split / chunk), "slice" ((axis, start, stop) of a one-axis
    Slice)."""

    node: str
    name: str
    value: object


@dataclass(frozen=True)
class QuantizeValue:
    """Quantize activation `value` on an affine grid and dequantize it again for its readers
    (`users`: node names; empty = every reader). ONNX: a QuantizeLinear, and one
    DequantizeLinear per reader (ONNX Runtime fuses a quantized op only when its DQ inputs are
    its own); fx: a fake-quantize module (straight-through gradient). `node` names the producer
    (or the value itself for a graph input), for error messages."""

    node: str
    value: str
    scale: float
    zero_point: int
    dtype: str = "uint8"  # "uint8" | "int8"
    users: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class QuantizeParam:
    """Store parameter `role` of `node` as the integers `values` (canonical layout, int8 or
    int32), read through a dequantize (values - zero_point) * scale, per channel along `axis`
    of the canonical layout (None: per tensor). ONNX: an integer initializer and a
    DequantizeLinear; fx: a fake-quantize parametrization of the module's float tensor with
    the same grid (trainable with a straight-through gradient; exports as Q/DQ)."""

    node: str
    role: str
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


@dataclass(frozen=True)
class FuseActivation:
    """Replace `nodes` (in order; the last one's output is the result), which together compute
    activation `fn` of the first one's input, by one activation op. Frontends list what they
    can fuse in GraphView.fused_activations. ONNX: "silu" (Sigmoid + Mul) becomes ONNX
    Runtime's com.microsoft.QuickGelu(alpha=1), the op ORT's own fusion makes of the pair,
    which it cannot make once each reads its own DequantizeLinear."""

    node: str
    fn: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class ScaleValue:
    """Multiply activation `value` by `scale` along its last axis (one factor per channel) for
    the readers `users` (node names; empty = every reader): the others read it unscaled. ONNX:
    a Mul by a constant; fx: a multiplication by a buffer of the traced module. `node` names
    the producer, for error messages."""

    node: str
    value: str
    scale: np.ndarray
    users: tuple[str, ...] = ()


Edit = (SetParam | Bypass | ReplaceWithChain | ReplaceSubgraph | SliceParam | SetAttr
        | QuantizeValue | QuantizeParam | FuseActivation | ScaleValue)
