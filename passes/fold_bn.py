"""fold-bn: fold inference BatchNorm into a neighbouring Conv / ConvTranspose / Linear / Gemm /
MatMul, exactly.

Algorithm (per BatchNormalization node, BN(x) = s * x + t per channel, see passes/bn_math.py):
1. Backward, into the producer: the BN's input is made by a weighted layer, possibly through ops
   that commute with a per-channel affine (Identity/Dropout, average pooling without counted zero
   padding, adaptive/global average pooling, max pooling when every s > 0), or by a Concat on the
   channel axis all of whose inputs come straight from weighted layers (each absorbs its slice).
   Linear/MatMul producers qualify only when their output is (N, features), so the BN channel axis
   is the feature axis.
2. Forward, into the single consumer: a Conv (zero padding only when t == 0; reflect/replicate/
   circular padding commutes), or a Linear on a rank-2 input, optionally after a Flatten of
   (N, C, ...) to (N, C*...) (each channel's s, t repeated over its spatial positions).
3. Otherwise the BN stays, with the reason.

Invariants: outputs unchanged (verified at fp32 rtol 1e-4 / atol 1e-5 by the pass manager); every
tensor written belongs only to the layer that absorbs the BN. Never folds: a BN in training mode
(batch statistics), a BN after a nonlinearity, a producer whose output has other users, a weight
shared with other layers (unless copy-shared=true, which writes a private copy and says so). A
shared *bias* always gets a private copy (noted): it is small, and exporters merge equal constants
such as torchvision's all-zero conv biases into one initializer.
Several BNs folding into one layer (before and after it) compose in one plan.
Preserves no analysis (node set changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analyses import Shapes
from graphslim.edits import Bypass, SetParam
from graphslim.ir import WEIGHTED, GraphView, Node, OpKind
from graphslim.pass_manager import Pass, Plan, register_pass
from graphslim.passes.bn_math import bn_affine, fold_into_input, fold_into_output

_CIRCULAR_PADS = ("reflect", "replicate", "circular")


class _NoFold(Exception):
    """Why one direction of folding does not apply (message goes into the skip reason)."""


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Options: copy_shared (fold into a layer whose weight other layers share, by giving it a
    private copy), forward (also fold a BN into the conv/linear that follows it)."""

    name = "fold-bn"
    lossless = True
    summary = "fold inference BatchNorm into adjacent Conv/ConvTranspose/Linear/Gemm/MatMul"
    copy_shared: bool = False
    forward: bool = True

    def plan(self, view: GraphView, analyses) -> Plan:
        shapes = analyses.get(Shapes)
        plan = Plan()
        folder = _Folder(view, shapes, self.copy_shared, plan)
        bypasses = []
        for bn in view.nodes():
            if bn.kind is not OpKind.BATCHNORM:
                continue
            reasons = []
            for direction in ("backward", "forward") if self.forward else ("backward",):
                try:
                    getattr(folder, direction)(bn)
                except _NoFold as why:
                    reasons.append(f"{direction}: {why}")
                    continue
                bypasses.append(Bypass(bn.name))
                plan.stats[f"folded_{direction}"] += 1
                break
            else:
                plan.skip(bn.name, "; ".join(reasons))
        plan.edits = [SetParam(n, r, v) for (n, r), v in folder.pending.items()] + bypasses
        plan.stats["left"] = len(plan.skipped)
        return plan


class _Folder:
    """Works out the folds for one plan; `pending` holds each touched (node, role) value so that
    several BNs folding into one layer compose."""

    def __init__(self, view: GraphView, shapes: dict, copy_shared: bool, plan: Plan):
        self.view, self.shapes, self.copy_shared, self.plan = view, shapes, copy_shared, plan
        self.pending: dict[tuple[str, str], np.ndarray] = {}

    # --- helpers ---------------------------------------------------------------------------------
    def _affine(self, bn: Node) -> tuple[np.ndarray, np.ndarray]:
        if bn.attrs.get("training"):
            raise _NoFold("BatchNorm is in training mode (uses batch statistics)")
        if "mean" not in bn.params or "var" not in bn.params:
            raise _NoFold("running statistics are not constants")
        if self._module_calls(bn, "mean") > 1:
            raise _NoFold("the BatchNorm module is called at several sites")
        get = self.view.param
        return bn_affine(get(bn.name, "mean"), get(bn.name, "var"), bn.attrs.get("eps", 1e-5),
                         get(bn.name, "scale") if "scale" in bn.params else None,
                         get(bn.name, "bias") if "bias" in bn.params else None)

    def _current(self, node: str, role: str) -> np.ndarray | None:
        if (node, role) in self.pending:
            return self.pending[(node, role)]
        return self.view.param(node, role) if role in self.view.node(node).params else None

    def _only_user(self, value: str, user: Node) -> None:
        users = self.view.users(value)
        if self.view.is_graph_output(value):
            raise _NoFold(f"'{value}' is also a graph output")
        if len(users) != 1 or users[0].name != user.name:
            raise _NoFold(f"'{value}' has {len(users)} users")

    def _check_private(self, node: Node) -> None:
        for role in ("weight", "bias"):
            if role not in node.params:
                continue
            users = self.view.param_users(node.name, role)
            if len(users) <= 1:
                continue
            if self._module_calls(node, role) > 1:
                raise _NoFold(f"the module of '{node.name}' is called at several sites")
            # A shared bias is small, and exporters merge equal constants (torchvision's zero
            # conv biases become one initializer): a private copy is always made for it.
            if not self.copy_shared and role == "weight":
                raise _NoFold(f"{role} of '{node.name}' is shared with {len(users) - 1} other "
                              "node(s) (copy-shared=true folds into a private copy)")
            self.plan.notes.append(f"'{node.name}' got a private copy of its shared {role}")

    def _module_calls(self, node: Node, role: str) -> int:
        """How many call sites share this node's module (fx: one module called twice); a
        private copy cannot separate those. ONNX nodes have no module: 1."""
        module = node.attrs.get("module")
        if module is None:
            return 1
        return sum(self.view.node(u).attrs.get("module") == module
                   for u in self.view.param_users(node.name, role))

    def _rank(self, value: str) -> int | None:
        shape = self.shapes.get(value)
        return None if shape is None else len(shape)

    # --- backward: into the producer -----------------------------------------------------------
    def backward(self, bn: Node) -> None:
        s, t = self._affine(bn)
        prod, consumer = self.view.producer(bn.inputs[0]), bn
        while prod is not None and prod.kind not in WEIGHTED and prod.kind is not OpKind.CONCAT:
            self._commutes(prod, s, t)
            self._only_user(prod.output, consumer)
            prod, consumer = self.view.producer(prod.inputs[0]), prod
        if prod is None:
            raise _NoFold("input is a graph input")
        self._only_user(prod.output, consumer)
        if prod.kind is OpKind.CONCAT:
            return self._backward_concat(prod, s, t)
        self._absorb_output(prod, s, t)

    def _commutes(self, node: Node, s: np.ndarray, t: np.ndarray) -> None:
        a, k = node.attrs, node.kind
        if k in (OpKind.IDENTITY, OpKind.POOL_GLOBAL_AVG):
            return
        if k is OpKind.POOL_AVG:
            padded = any(a.get("pads") or ()) and a.get("count_include_pad", 0)
            if a.get("adaptive") or (not padded and a.get("divisor_override") is None):
                return
            if not np.any(t):
                return
            raise _NoFold(f"'{node.name}' averages zero padding into the window")
        if k in (OpKind.POOL_MAX, OpKind.POOL_GLOBAL_MAX):
            if np.all(s > 0):
                return
            raise _NoFold(f"'{node.name}' is a max pool and some BN scales are <= 0")
        what = "a nonlinearity" if k is OpKind.ACTIVATION else "not a foldable layer"
        raise _NoFold(f"follows {node.describe()}, {what}")

    def _absorb_output(self, node: Node, s: np.ndarray, t: np.ndarray) -> None:
        if node.kind is OpKind.LINEAR and self._rank(node.output) != 2:
            raise _NoFold(f"'{node.name}' output is not (N, features); BN axis 1 is not its "
                          "feature axis")
        self._check_private(node)
        groups = node.attrs.get("groups", 1)
        w, b = fold_into_output(self._current(node.name, "weight"),
                                self._current(node.name, "bias"), s, t,
                                transpose_conv=node.kind is OpKind.CONV_TRANSPOSE, groups=groups)
        self.pending[(node.name, "weight")] = w
        self.pending[(node.name, "bias")] = b

    def _backward_concat(self, cat: Node, s: np.ndarray, t: np.ndarray) -> None:
        rank = self._rank(cat.output)
        axis = cat.attrs.get("axis")
        if rank is None or axis is None or axis % rank != 1:
            raise _NoFold(f"concat '{cat.name}' is not on the channel axis")
        if len(set(cat.inputs)) != len(cat.inputs):
            raise _NoFold(f"concat '{cat.name}' repeats an input")
        offset, parts = 0, []
        for v in cat.inputs:
            prod = self.view.producer(v)
            if prod is None or prod.kind not in WEIGHTED:
                raise _NoFold(f"concat input '{v}' does not come from a conv/linear")
            self._only_user(v, cat)
            c = self.shapes.get(v, (None, None))[1]
            if c is None:
                raise _NoFold(f"channel count of '{v}' is unknown")
            parts.append((prod, slice(offset, offset + c)))
            offset += c
        if offset != len(s):
            raise _NoFold(f"concat channels {offset} != BN channels {len(s)}")
        for prod, sl in parts:
            self._absorb_output(prod, s[sl], t[sl])

    # --- forward: into the consumer ------------------------------------------------------------
    def forward(self, bn: Node) -> None:
        s, t = self._affine(bn)
        users = self.view.users(bn.output)
        if len(users) != 1 or self.view.is_graph_output(bn.output):
            raise _NoFold(f"output has {len(users)} users")
        user = users[0]
        if user.kind is OpKind.FLATTEN:
            s, t, user = self._through_flatten(bn, user, s, t)
        if user.kind is OpKind.CONV:
            self._into_conv(user, s, t)
        elif user.kind is OpKind.LINEAR:
            if self._rank(user.inputs[0]) != 2:
                raise _NoFold(f"'{user.name}' input is not (N, features)")
            self._absorb_input(user, s, t, groups=1)
        else:
            raise _NoFold(f"user {user.describe()} cannot absorb a BN on its input")

    def _through_flatten(self, bn: Node, flat: Node, s, t):
        src, dst = self.shapes.get(bn.output), self.shapes.get(flat.output)
        if not src or not dst or len(dst) != 2 or dst[0] != src[0] or \
                dst[1] != int(np.prod(src[1:])):
            raise _NoFold(f"flatten '{flat.name}' is not (N, C, ...) -> (N, C*...)")
        users = self.view.users(flat.output)
        if len(users) != 1 or users[0].kind is not OpKind.LINEAR:
            raise _NoFold(f"flatten '{flat.name}' does not feed a single linear layer")
        spatial = int(np.prod(src[2:]))
        return np.repeat(s, spatial), np.repeat(t, spatial), users[0]

    def _into_conv(self, conv: Node, s, t) -> None:
        pads = conv.attrs.get("pads")
        zero_padded = conv.attrs.get("padding_mode", "zeros") not in _CIRCULAR_PADS and (
            pads is None or any(pads))
        if zero_padded and np.any(t):
            raise _NoFold(f"'{conv.name}' zero-pads its input and the BN shift is nonzero")
        self._absorb_input(conv, s, t, groups=conv.attrs.get("groups", 1))

    def _absorb_input(self, node: Node, s, t, groups: int) -> None:
        self._check_private(node)
        w, b = fold_into_input(self._current(node.name, "weight"),
                               self._current(node.name, "bias"), s, t, groups=groups)
        self.pending[(node.name, "weight")] = w
        self.pending[(node.name, "bias")] = b
