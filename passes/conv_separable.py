"""conv-separable: the approximate rewrite of a dense KxK conv into depthwise + pointwise
(MobileNet's form), beside the exact rewrites of conv-substitute (passes/conv_substitute.py);
weight math in passes/conv_math.py."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from graphslim.analyses import Shapes
from graphslim.analyses.cost import chain_macs
from graphslim.edits import Layer, ReplaceWithChain
from graphslim.ir import GraphView, OpKind, conv_geometry
from graphslim.pass_manager import Plan, register_pass
from graphslim.passes import conv_math as cm
from graphslim.passes import site_choice as sc


@register_pass
@dataclass(frozen=True)
class SeparateConv(sc.ChoosingPass):
    """conv-separable: a dense KxK conv -> depthwise KxK (channel multiplier m) + pointwise 1x1,
    MobileNet style, fitted by least squares on the original weights (per input channel, a
    rank-m SVD; passes/conv_math.separable_factors). Lossy: the relative weight error of each
    layer is in the details; layers above `max-error` (0: no limit) or saving less than
    `min-saving` of their MACs are left with the reason, and with `choose=latency` those not
    `min-gain` faster on ORT CPU (passes/site_choice.py)."""

    name = "conv-separable"
    lossless = False
    summary = "approximate: dense KxK conv -> depthwise + pointwise, least-squares fit"
    multiplier: int = 1
    max_error: float = 0.0
    min_saving: float = 0.1
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, not {self.multiplier}")
        if self.max_error < 0:
            raise ValueError(f"max-error must be >= 0, not {self.max_error}")

    def plan(self, view: GraphView, analyses) -> Plan:
        shapes = analyses.get(Shapes)
        plan = Plan()
        for node in view.nodes():
            if node.kind is not OpKind.CONV or any(fnmatch.fnmatch(node.name, p)
                                                   for p in self.exclude):
                continue
            a = node.attrs
            if a.get("groups", 1) != 1 or len(a.get("kernel_shape", ())) != 2 or \
                    all(k == 1 for k in a["kernel_shape"]) or a.get("pads") is None:
                continue
            weight = view.param(node.name, "weight")
            bias = view.param(node.name, "bias") if "bias" in node.params else None
            depth, point, error = cm.separable_factors(weight, self.multiplier)
            chain = (Layer(OpKind.CONV, depth, None, weight.shape[1], *conv_geometry(node)),
                     Layer(OpKind.CONV, point, bias))
            in_shape = shapes.get(node.inputs[0])
            before = chain_macs((Layer(OpKind.CONV, weight, None, 1, *conv_geometry(node)),),
                                in_shape)
            after = chain_macs(chain, in_shape)
            if after > (1 - self.min_saving) * before:
                plan.skip(node.name, f"separable: {after} MACs vs {before}, saves less than "
                          f"{self.min_saving:.0%}")
                continue
            if self.max_error and error > self.max_error:
                plan.skip(node.name, f"separable: weight error {error:.3f} above max-error "
                          f"{self.max_error}")
                continue
            detail = {"node": node.name, "rewrite": "separable", "multiplier": self.multiplier,
                      "macs_before": before, "macs_after": after,
                      "weight_rel_error": round(error, 6)}
            if not self.latency_allows(node.name, "separable", (sc.node_layer(view, node),), chain,
                                       in_shape, plan, detail):
                continue
            plan.edits.append(ReplaceWithChain(node.name, chain))
            plan.stats["separated"] += 1
            plan.details.append(detail)
        return plan
