"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), an exact
rewrite that evens out per-channel weight ranges before per-tensor or per-channel int8.

For a pair  y = W2 f(W1 x + b1) + b2  where f is ReLU or nothing (positively homogeneous:
f(x / s) = f(x) / s for s > 0), channel i of the middle tensor is rescaled:
    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i,  s_i = sqrt(r1_i * r2_i) / r2_i
with r1_i = max|W1[i]| and r2_i = max|W2[:, i]| (for a depthwise W2, max|W2[i]|), which makes
both ranges sqrt(r1_i r2_i). The outputs are unchanged (verified by the pass manager, fp32
tolerances). Chains (conv -> relu -> conv -> relu -> conv) are swept `rounds` times, each pair
with the weights the previous pair left. Run after fold-bn (a BatchNorm between the layers
blocks the pair) and before qdq.

Skipped, with the reason: ReLU6 / other activations between (not homogeneous: clipping at 6
changes under scaling), a middle tensor read by anything else, grouped (non-depthwise) convs.
Preserves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.edits import SetParam
from graphslim.ir import GraphView, Node, OpKind
from graphslim.pass_manager import Pass, Plan, register_pass


def equalize_pair(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, depthwise2: bool):
    """The rescaled (w1, b1, w2) of one pair (formula in the module docstring).

    Computed in float64: real models carry dead channels (weights ~1e-34 in PP-OCRv4) whose
    r1 * r2 underflows float32 to 0 and gave s = 0, then inf / NaN weights. A channel whose range
    is below `_DEAD` of its layer's largest is left unscaled (s = 1), and s is bounded so no
    weight leaves float32's normal range."""
    w1d, w2d = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    r1 = np.abs(w1d).reshape(len(w1d), -1).max(1)
    r2 = (np.abs(w2d).reshape(len(w2d), -1).max(1) if depthwise2 else
          np.abs(np.moveaxis(w2d, 1, 0)).reshape(w2d.shape[1], -1).max(1))
    ok = (r1 > _DEAD * max(float(r1.max(initial=0.0)), 1e-300)) & \
        (r2 > _DEAD * max(float(r2.max(initial=0.0)), 1e-300))
    s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
    s = np.clip(s, 1.0 / _MAX_SCALE, _MAX_SCALE)
    shape1 = (-1,) + (1,) * (w1d.ndim - 1)
    w1d = w1d / s.reshape(shape1)
    b1 = None if b1 is None else np.asarray(b1, np.float64) / s
    if depthwise2:
        w2d = w2d * s.reshape(shape1[:1] + (1,) * (w2d.ndim - 1))
    else:
        w2d = w2d * s.reshape((1, -1) + (1,) * (w2d.ndim - 2))
    return w1d.astype(np.float32), None if b1 is None else b1.astype(np.float32), \
        w2d.astype(np.float32)


#: a channel whose weight range is below this fraction of its layer's largest is dead: unscaled
_DEAD = 1e-8
#: bound on one channel's scale factor (keeps weights far inside float32's normal range)
_MAX_SCALE = 1e6


def _layer(view: GraphView, n: Node) -> str | None:
    """'dense' | 'depthwise' for an equalizable conv / linear, else None."""
    if n.kind is OpKind.LINEAR and "weight" in n.params:
        return "dense"
    if n.kind is OpKind.CONV and "weight" in n.params:
        g = n.attrs.get("groups", 1)
        if g == 1:
            return "dense"
        shape, _ = view.param_info(n.name, "weight")
        return "depthwise" if shape[0] == g and shape[1] == 1 else None
    return None


@register_pass
@dataclass(frozen=True)
class EqualizeLayers(Pass):
    name = "equalize"
    lossless = True
    summary = "cross-layer equalization of conv/linear pairs through ReLU (exact)"
    rounds: int = 2

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, not {self.rounds}")

    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        pairs = self._pairs(view, plan)
        weights: dict[tuple[str, str], np.ndarray | None] = {}

        def get(node: str, role: str):
            if (node, role) not in weights:
                weights[node, role] = view.param(node, role) if view.has_param(node, role) \
                    else None
            return weights[node, role]

        for _ in range(self.rounds):
            for first, second, kind2 in pairs:
                w1, b1, w2 = equalize_pair(get(first.name, "weight"), get(first.name, "bias"),
                                           get(second.name, "weight"), kind2 == "depthwise")
                weights[first.name, "weight"], weights[second.name, "weight"] = w1, w2
                weights[first.name, "bias"] = b1
        for (node, role), value in weights.items():
            if value is not None:
                plan.edits.append(SetParam(node, role, value))
        plan.stats["pairs"] = len(pairs)
        return plan

    def _pairs(self, view: GraphView, plan: Plan) -> list[tuple[Node, Node, str]]:
        pairs = []
        for first in view.nodes():
            if _layer(view, first) is None or view.is_graph_output(first.output):
                continue
            users = view.users(first.output)
            if len(users) != 1:
                continue
            second, via = users[0], first.output
            if second.kind is OpKind.ACTIVATION:
                fn = second.attrs.get("fn")
                if fn != "relu":
                    plan.skip(first.name, f"equalize: '{fn}' after it is not positively "
                              "homogeneous")
                    continue
                via = second.output
                users = [] if view.is_graph_output(via) else view.users(via)
                if len(users) != 1:
                    continue
                second = users[0]
            kind2 = _layer(view, second)
            if kind2 is None or second.inputs[:1] != (via,):
                continue
            if any(view.param_users(n.name, "weight") != (n.name,) for n in (first, second)):
                plan.skip(first.name, "equalize: a weight is shared with another node")
                continue
            pairs.append((first, second, kind2))
        return pairs
