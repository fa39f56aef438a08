"""conv-group: approximate: a dense conv becomes a grouped conv with g groups, after the channel
reordering that keeps the most weight inside the g diagonal blocks (ShuffleNet / ResNeXt style
grouping of a trained dense layer).

Algorithm (weight math in passes/conv_math.best_blocks): alternating balanced assignment of
output and input channels to blocks, each step an exact linear assignment; zeroing the weight
outside the blocks is then the least-squares grouped fit of the original weights, with relative
weight error sqrt(outside mass / total). The reorderings are folded into the neighbours exactly
(passes/channel_order.py: producer rows, norm parameters, consumer columns); a side that cannot
be reordered (graph input, concat, tied channels: the reason is in the details) keeps its order
and only the other side is optimised. MACs and parameters of the layer fall g-fold.

Lossy: each layer's weight error is in the details, the pass manager reports the output error;
layers above `max-error` (0: no limit) are left with the reason. Convs whose channel counts `g`
does not divide, already grouped convs and those with fewer than `min-channels` input channels
per group are skipped with the reason; with `choose=latency`, those whose grouped conv is not
`min-gain` faster on ORT CPU than the dense one (passes/site_choice.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from graphslim.analyses import Shapes
from graphslim.analyses.channels import ChannelDepsAnalysis
from graphslim.edits import Layer, ReplaceWithChain
from graphslim.ir import GraphView, OpKind, conv_geometry
from graphslim.pass_manager import Plan, register_pass
from graphslim.passes import channel_order as co
from graphslim.passes import conv_math as cm
from graphslim.passes import site_choice as sc


@register_pass
@dataclass(frozen=True)
class GroupConv(sc.ChoosingPass):
    name = "conv-group"
    lossless = False
    summary = "approximate: dense conv -> grouped conv after the best channel reordering"
    groups: int = 2
    max_error: float = 0.0
    min_channels: int = 4
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.groups < 2:
            raise ValueError(f"groups must be >= 2, not {self.groups}")
        if self.max_error < 0 or self.min_channels < 1:
            raise ValueError("max-error must be >= 0 and min-channels >= 1")

    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        deps = analyses.get(ChannelDepsAnalysis)
        shapes = analyses.get(Shapes) if self.choose == "latency" else {}
        pending: dict[tuple, np.ndarray] = {}  # (node, role, axis) -> gather planned so far
        fixed_groups: set[int] = set()  # channel groups a planned layer depends on the order of
        for node in view.nodes():
            if node.kind is not OpKind.CONV or node.attrs.get("groups", 1) != 1 or \
                    node.attrs.get("pads") is None or \
                    any(fnmatch.fnmatch(node.name, p) for p in self.exclude):
                continue
            self._group(view, node, deps, shapes, pending, fixed_groups, plan)
        return plan

    def _group(self, view, node, deps, shapes, pending: dict, fixed_groups: set,
               plan: Plan) -> None:
        g = self.groups
        weight = view.param(node.name, "weight")
        bias = view.param(node.name, "bias") if "bias" in node.params else None
        n, c = weight.shape[:2]
        if n % g or c % g or c // g < self.min_channels:
            plan.skip(node.name, f"conv-group: {c} -> {n} channels do not split into {g} "
                      f"groups of at least {self.min_channels} inputs")
            return
        # earlier layers of this plan may have reordered this layer's channels already
        for axis in (0, 1):
            if (node.name, "weight", axis) in pending:
                weight = np.take(weight, pending[(node.name, "weight", axis)], axis=axis)
        if bias is not None and (node.name, "bias", 0) in pending:
            bias = bias[pending[(node.name, "bias", 0)]]
        fixed, groups = {}, {}
        for axis in (0, 1):
            found = co.reorderable(deps, node.name, axis)
            if isinstance(found, str):
                fixed[axis] = found
                continue
            groups[axis] = found[1].index
            if groups[axis] in fixed_groups:
                fixed[axis] = "already reordered for another layer of this run"
        if co.groups_of(deps, node.name, 0) & co.groups_of(deps, node.name, 1):
            # one reordering would move both sides; blocks need them apart: keep both orders
            fixed = {a: "its input and output channels are tied (a residual around it)"
                     for a in (0, 1)}
        out_order, in_order, error = cm.best_blocks(weight, g, fix_out=0 in fixed,
                                                     fix_in=1 in fixed)
        if self.max_error and error > self.max_error:
            plan.skip(node.name, f"conv-group: weight error {error:.3f} with {g} groups "
                      f"above max-error {self.max_error}")
            return
        w = weight[out_order][:, in_order]
        layer = Layer(OpKind.CONV, cm.to_grouped(w, g), None if bias is None else
                      bias[out_order], g, *conv_geometry(node))
        detail = {"node": node.name, "rewrite": "grouped", "groups": g,
                  "weight_rel_error": round(error, 6),
                  **{f"kept_{'output' if a == 0 else 'input'}_order": r for a, r in fixed.items()}}
        dense = Layer(OpKind.CONV, weight, bias, 1, *conv_geometry(node))
        if not self.latency_allows(node.name, "conv-group", (dense,), (layer,),
                                   shapes.get(node.inputs[0]), plan, detail):
            return
        reorders = []
        for axis, order in ((1, in_order), (0, out_order)):
            if axis in fixed:
                continue
            found = co.reorder_edits(deps, node.name, axis, order)
            if isinstance(found, str):  # reorderable() checked this; never plan half a rewrite
                plan.skip(node.name, f"conv-group: channels cannot be reordered: {found}")
                return
            reorders.append(found)
        for found in reorders:
            for e in found.edits:
                key = (e.node, e.role, e.axis)
                pending[key] = pending[key][e.keep] if key in pending else e.keep
            plan.edits += found.edits
        fixed_groups.update(*(co.groups_of(deps, node.name, axis) for axis in (0, 1)))
        plan.edits.append(ReplaceWithChain(node.name, (layer,)))
        plan.stats["grouped"] += 1
        plan.details.append(detail)
