"""conv-substitute: exact rewrites of convolutions into cheaper forms (weight math in
passes/conv_math.py).

- `grouped`: a dense conv whose weight is block-diagonal (exact zeros outside g diagonal blocks,
  e.g. after group-structured pruning, or from a converter that expanded groups) becomes a
  grouped conv with g groups; g = in-channels is a depthwise conv. MACs fall g-fold.
- `merge`: a Conv or Linear followed directly by a pointwise layer (1x1 conv with stride 1 and
  no padding, or Linear) with no nonlinearity between, the first's output read by nothing else,
  becomes one layer, where that costs fewer MACs than the pair (merging an expanding pair saves;
  merging a bottleneck would not, and is skipped with the reason).

Lossless: verified against the graph before the pass (fp32 tolerances). Preserves nothing.
The approximate depthwise-separable rewrite is the `conv-separable` pass below. Not yet here
(see the issue): 1x1 conv <-> MatMul, Linear after global pooling <-> 1x1 conv, block
structure under a channel permutation (approximate grouping), choice by measured latency.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from graphslim.analyses import Shapes
from graphslim.analyses.cost import chain_macs
from graphslim.edits import Bypass, Layer, ReplaceWithChain
from graphslim.ir import GraphView, Node, OpKind, conv_geometry
from graphslim.pass_manager import Pass, Plan, register_pass
from passes import conv_math as cm

REWRITES = ("grouped", "merge")


def _is_pointwise(node: Node) -> bool:
    if node.kind is OpKind.LINEAR:
        return True
    a = node.attrs
    return (node.kind is OpKind.CONV and a.get("groups", 1) == 1
            and all(k == 1 for k in a.get("kernel_shape", ())) and a.get("pads") is not None
            and not any(a["pads"]) and all(s == 1 for s in a.get("strides", ())))


@register_pass
@dataclass(frozen=True)
class SubstituteConv(Pass):
    name = "conv-substitute"
    lossless = True
    summary = "exact rewrites: block-diagonal conv -> grouped/depthwise, merge linear pairs"
    rewrites: tuple[str, ...] = REWRITES
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        bad = [r for r in self.rewrites if r not in REWRITES]
        if bad or not self.rewrites:
            raise ValueError(f"rewrites must be a ';'-list of {', '.join(REWRITES)}, "
                             f"not {';'.join(self.rewrites) or 'nothing'}")

    def plan(self, view: GraphView, analyses) -> Plan:
        shapes = analyses.get(Shapes)
        plan = Plan()
        claimed: set[str] = set()
        for node in view.nodes():
            if any(fnmatch.fnmatch(node.name, p) for p in self.exclude) or node.name in claimed:
                continue
            if "merge" in self.rewrites and node.kind in (OpKind.CONV, OpKind.LINEAR):
                if self._merge(view, node, shapes, plan, claimed):
                    continue
            if "grouped" in self.rewrites and node.kind is OpKind.CONV:
                self._grouped(view, node, plan, claimed)
        return plan

    def _grouped(self, view: GraphView, node: Node, plan: Plan, claimed: set) -> None:
        if node.attrs.get("groups", 1) != 1 or node.attrs.get("pads") is None:
            return
        weight = view.param(node.name, "weight")
        groups = cm.block_groups(weight)
        if groups == 1:
            return
        bias = view.param(node.name, "bias") if "bias" in node.params else None
        layer = Layer(OpKind.CONV, cm.to_grouped(weight, groups), bias, groups,
                      *conv_geometry(node))
        plan.edits.append(ReplaceWithChain(node.name, (layer,)))
        claimed.add(node.name)
        kind = "depthwise" if groups == weight.shape[1] else "grouped"
        plan.stats[f"to_{kind}"] += 1
        plan.details.append({"node": node.name, "rewrite": kind, "groups": groups})

    def _merge(self, view: GraphView, first: Node, shapes: dict, plan: Plan,
               claimed: set) -> bool:
        users = view.users(first.output)
        if len(users) != 1 or view.is_graph_output(first.output):
            return False
        second = users[0]
        if not _is_pointwise(second) or second.name in claimed or \
                second.kind is not first.kind and first.kind is OpKind.LINEAR:
            return False
        if first.kind is OpKind.CONV and (first.attrs.get("groups", 1) != 1 or
                                          first.attrs.get("pads") is None):
            return False
        in_shape = shapes.get(first.inputs[0])
        if not in_shape:
            plan.skip(first.name, "merge: input shape unknown")
            return False
        get = view.param
        w, b = cm.merge_pointwise(get(first.name, "weight"),
                                  get(first.name, "bias") if "bias" in first.params else None,
                                  get(second.name, "weight"),
                                  get(second.name, "bias") if "bias" in second.params else None)
        geometry = conv_geometry(first) if first.kind is OpKind.CONV else ()
        merged = Layer(first.kind, w, b, 1, *geometry)
        pair = (Layer(first.kind, get(first.name, "weight"), None, 1, *geometry),
                Layer(second.kind, get(second.name, "weight")))
        before, after = chain_macs(pair, in_shape), chain_macs((merged,), in_shape)
        if after >= before:
            plan.skip(first.name, f"merge with '{second.name}': {after} MACs merged vs {before} "
                      "for the pair, not cheaper")
            return False
        plan.edits += [ReplaceWithChain(first.name, (merged,)), Bypass(second.name)]
        claimed.update((first.name, second.name))
        plan.stats["merged"] += 1
        plan.details.append({"node": first.name, "rewrite": "merge", "with": second.name,
                             "macs_before": before, "macs_after": after})
        return True


@register_pass
@dataclass(frozen=True)
class SeparateConv(Pass):
    """conv-separable: a dense KxK conv -> depthwise KxK (channel multiplier m) + pointwise 1x1,
    MobileNet style, fitted by least squares on the original weights (per input channel, a
    rank-m SVD; passes/conv_math.separable_factors). Lossy: the relative weight error of each
    layer is in the details; layers above `max-error` (0: no limit) or saving less than
    `min-saving` of their MACs are left with the reason."""

    name = "conv-separable"
    lossless = False
    summary = "approximate: dense KxK conv -> depthwise + pointwise, least-squares fit"
    multiplier: int = 1
    max_error: float = 0.0
    min_saving: float = 0.1
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
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
            plan.edits.append(ReplaceWithChain(node.name, chain))
            plan.stats["separated"] += 1
            plan.details.append({"node": node.name, "rewrite": "separable",
                                 "multiplier": self.multiplier, "macs_before": before,
                                 "macs_after": after, "weight_rel_error": round(error, 6)})
        return plan
