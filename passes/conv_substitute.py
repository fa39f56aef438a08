"""conv-substitute: exact rewrites of convolutions into cheaper forms (weight math in
passes/conv_math.py, channel reordering in passes/channel_order.py).

- `grouped`: a dense conv whose weight is block-diagonal (exact zeros outside g diagonal blocks,
  e.g. after group-structured pruning, or from a converter that expanded groups) becomes a
  grouped conv with g groups; g = in-channels is a depthwise conv. MACs fall g-fold. When the
  blocks only appear after reordering input and output channels (connected components of the
  weight's nonzero pattern), the reordering is folded into the neighbours: every tensor that
  carries those channels (producer rows, norm parameters, consumer columns) is permuted the same
  way, found by ChannelDeps as for pruning.
- `merge`: a Conv or Linear followed directly by a pointwise layer (1x1 conv with stride 1 and
  no padding, or Linear) with no nonlinearity between, the first's output read by nothing else,
  becomes one layer, where that costs fewer MACs than the pair (merging an expanding pair saves;
  merging a bottleneck would not, and is skipped with the reason).
- `to-matmul`: a 1x1 conv (stride 1, no padding, one group) becomes a MatMul over the flattened
  pixels, or a Gemm when its input is one pixel (the SE blocks' convs after global pooling).
- `to-conv`: a Linear on (N, C), such as a classifier after global pooling, becomes a 1x1 conv;
  a 1x1 conv written as MatMul over flattened pixels (reshape, W (O, C) @ x (N, C, H*W), bias
  add, reshape back: converters, or to-matmul's own output) becomes one Conv again.

Which sites change (`choose`): `cost` takes every rewrite that does not add MACs (the two form
rewrites keep MACs equal, so they apply wherever asked); `latency` measures each site alone on
ONNX Runtime CPU (graphslim/sites.py, at the model's batch or `batch`) and rewrites only where the
new form is at least `min-gain` faster: the field notes measured 1x1 conv -> MatMul slower
everywhere and FC -> 1x1 conv faster at batch 1 but slower at batch 32, so the form rewrites are
meant to be used with `choose=latency`. A 4-D site is timed between two identity depthwise convs
(`context`): ORT runs convs in its blocked NCHWc layout, and a MatMul between two convs pays the
layout reorders around it. Timed truly alone, a 1x1 conv pays them itself and 10 of
mobilenet_v3_large's 1x1 convs looked up to 1.38x faster as MatMuls, yet the model with them
rewritten ran 0.94x as fast; in context every one measures slower, as the whole model does.

Lossless: verified against the graph before the pass (fp32 tolerances). Preserves nothing.
After `to-matmul` with spatial pixels the ONNX graph holds a MatMul other passes do not edit:
run it last. The approximate rewrites are `conv-separable` (passes/conv_separable.py) and
`conv-group` (passes/conv_group.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from graphslim.analyses import Shapes
from graphslim.analyses.channels import ChannelDepsAnalysis
from graphslim.analyses.cost import chain_macs
from graphslim.edits import Bypass, Edit, Layer, ReplaceSubgraph, ReplaceWithChain
from graphslim.ir import GraphView, Node, OpKind, conv_geometry
from graphslim.pass_manager import Plan, register_pass
from graphslim.passes import channel_order as co
from graphslim.passes import conv_math as cm
from graphslim.passes import site_choice as sc

REWRITES = ("grouped", "merge", "to-matmul", "to-conv")
DEFAULT_REWRITES = ("grouped", "merge")


def _is_pointwise(node: Node) -> bool:
    if node.kind is OpKind.LINEAR:
        return True
    a = node.attrs
    return (node.kind is OpKind.CONV and a.get("groups", 1) == 1
            and all(k == 1 for k in a.get("kernel_shape", ())) and a.get("pads") is not None
            and not any(a["pads"]) and all(s == 1 for s in a.get("strides", ())))


@dataclass
class _Candidate:
    """One site's rewrite: the layers as they are and as they would be (for cost and latency),
    the edits, the nodes it claims and what the report says."""

    node: str
    before: tuple[Layer, ...]
    after: tuple[Layer, ...]
    in_shape: tuple
    edits: list[Edit]
    claims: set[str]
    stat: str
    detail: dict
    groups: set[int] = field(default_factory=set)


def _constants(view: GraphView, node: Node) -> dict[int, np.ndarray]:
    """Constant operands of `node` by input slot: parameters (ONNX: roles x / in<i>) and
    values made by CONSTANT nodes (fx get_attr)."""
    found = {}
    for role in node.params:
        slot = 0 if role == "x" else int(role[2:]) if role[2:].isdigit() else None
        if slot is not None:
            found[slot] = view.param(node.name, role)
    for i, value in enumerate(node.inputs):
        producer = view.producer(value)
        if producer is not None and producer.kind is OpKind.CONSTANT and "value" in \
                producer.params:
            found[i] = view.param(producer.name, "value")
    return found


_SHAPE_MATH = (OpKind.SHAPE, OpKind.GATHER, OpKind.SLICE, OpKind.CONCAT, OpKind.RESHAPE,
               OpKind.ELEMENTWISE)


def _only_user(view: GraphView, node: Node, shape_reads: list | None = None) -> Node | None:
    """The one reader of `node`'s output; readers of its shape only (exporters compute reshape
    targets from it) are collected in `shape_reads` when given."""
    users = view.users(node.output)
    if shape_reads is not None:
        shape_reads += [u for u in users if u.kind is OpKind.SHAPE]
        users = [u for u in users if u.kind is not OpKind.SHAPE]
    return users[0] if len(users) == 1 and not view.is_graph_output(node.output) else None


def _only_feeds(view: GraphView, starts: list[Node], end: Node) -> bool:
    """Whether everything computed from `starts` (shape reads) ends in `end`: then removing the
    chain leaves them dead, not dangling."""
    stack, seen = list(starts), set()
    while stack:
        n = stack.pop()
        if n.name == end.name or n.name in seen:
            continue
        seen.add(n.name)
        if n.kind not in _SHAPE_MATH or view.is_graph_output(n.output):
            return False
        stack += view.users(n.output)
    return True


def _pixel_matmul(view: GraphView, node: Node, shapes: dict) -> _Candidate | None:
    """W (O, C) @ x (N, C, H*W) between a reshape of a 4-D x and a reshape back to (N, O, H, W),
    with an optional bias Add (O, 1) before the reshape back: a 1x1 conv written as a MatMul
    (converters; conv-substitute's own to-matmul). Becomes one Conv."""
    consts = _constants(view, node)
    w = consts.get(0)
    data = [v for v in node.inputs if view.producer(v) is None
            or view.producer(v).kind is not OpKind.CONSTANT]
    if w is None or w.ndim != 2 or len(data) != 1 or 1 in consts:
        return None
    flat = view.producer(data[0])
    if flat is None or flat.kind not in (OpKind.RESHAPE, OpKind.FLATTEN) or \
            _only_user(view, flat) is not node:
        return None
    x, (o, c) = flat.inputs[0], w.shape
    xs = shapes.get(x)
    if not xs or len(xs) != 4 or shapes.get(flat.output) != (xs[0], c, xs[2] * xs[3]):
        return None
    shape_reads: list[Node] = []
    chain, bias, nxt = [flat, node], None, _only_user(view, node, shape_reads)
    if nxt is not None and nxt.kind is OpKind.ADD:
        b = [v for v in _constants(view, nxt).values() if v.size == o and v.shape[-1] == 1]
        if len(b) != 1 or len(nxt.inputs) - len(_constants(view, nxt)) > 1:
            return None
        bias = b[0].reshape(o)
        chain.append(nxt)
        nxt = _only_user(view, nxt, shape_reads)
    if nxt is None or nxt.kind is not OpKind.RESHAPE or \
            shapes.get(nxt.output) != (xs[0], o, xs[2], xs[3]) or \
            not _only_feeds(view, shape_reads, nxt):
        return None
    chain.append(nxt)
    weight = np.asarray(w).reshape(o, c, 1, 1)
    conv = Layer(OpKind.CONV, weight, bias)
    return _Candidate(node.name, (Layer(OpKind.CONV, weight, bias, form="matmul"),), (conv,),
                      xs, [ReplaceSubgraph(flat.name, tuple(n.name for n in chain), x, (conv,))],
                      {n.name for n in chain}, "matmul_to_conv",
                      {"node": node.name, "rewrite": "matmul-to-conv",
                       "nodes": [n.name for n in chain]})


@register_pass
@dataclass(frozen=True)
class SubstituteConv(sc.ChoosingPass):
    name = "conv-substitute"
    lossless = True
    summary = ("exact rewrites: block-diagonal conv -> grouped/depthwise (under a channel "
               "reordering too), merge linear pairs, 1x1 conv <-> MatMul/Gemm, Linear -> 1x1 conv")
    rewrites: tuple[str, ...] = DEFAULT_REWRITES
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        bad = [r for r in self.rewrites if r not in REWRITES]
        if bad or not self.rewrites:
            raise ValueError(f"rewrites must be a ';'-list of {', '.join(REWRITES)}, "
                             f"not {';'.join(self.rewrites) or 'nothing'}")
        if "to-matmul" in self.rewrites and "to-conv" in self.rewrites:
            raise ValueError("to-matmul and to-conv undo each other: ask for one per pass")

    def plan(self, view: GraphView, analyses) -> Plan:
        shapes = analyses.get(Shapes)
        plan = Plan()
        claimed: set[str] = set()
        permuted: set[int] = set()  # channel groups already reordered by this plan
        for node in view.nodes():
            if any(fnmatch.fnmatch(node.name, p) for p in self.exclude) or node.name in claimed:
                continue
            cand = self._candidate(view, node, shapes, analyses, plan)
            if cand is None:
                continue
            if cand.claims & claimed or cand.groups & permuted:
                plan.skip(node.name, f"{cand.stat}: touches a layer or channels another rewrite "
                          "of this pass changes; run the pass again")
                continue
            if not self._chosen(cand, plan):
                continue
            plan.edits += cand.edits
            claimed |= cand.claims
            permuted |= cand.groups
            plan.stats[cand.stat] += 1
            plan.details.append(cand.detail)
        return plan

    def _candidate(self, view, node, shapes, analyses, plan) -> _Candidate | None:
        if node.kind is OpKind.MATMUL and "to-conv" in self.rewrites:
            return _pixel_matmul(view, node, shapes)
        if node.kind not in (OpKind.CONV, OpKind.LINEAR):
            return None
        in_shape = shapes.get(node.inputs[0]) if node.inputs else None
        if "merge" in self.rewrites:
            cand = self._merge(view, node, in_shape, plan)
            if cand is not None:
                return cand
        if "grouped" in self.rewrites and node.kind is OpKind.CONV:
            cand = self._grouped(view, node, in_shape, analyses, plan)
            if cand is not None:
                return cand
        if "to-matmul" in self.rewrites or "to-conv" in self.rewrites:
            return self._form(view, node, in_shape, plan)
        return None

    def _chosen(self, cand: _Candidate, plan: Plan) -> bool:
        return self.latency_allows(cand.node, cand.stat, cand.before, cand.after,
                                   cand.in_shape, plan, cand.detail)

    def _grouped(self, view, node, in_shape, analyses, plan) -> _Candidate | None:
        if node.attrs.get("groups", 1) != 1 or node.attrs.get("pads") is None:
            return None
        weight = view.param(node.name, "weight")
        bias = view.param(node.name, "bias") if "bias" in node.params else None
        groups = cm.block_groups(weight)
        edits: list[Edit] = []
        claims, touched_groups, detail = {node.name}, set(), {}
        if groups == 1:
            groups, out_order, in_order = cm.permuted_blocks(weight)
            if groups == 1:
                return None
            deps = analyses.get(ChannelDepsAnalysis)
            if co.groups_of(deps, node.name, 0) & co.groups_of(deps, node.name, 1):
                plan.skip(node.name, f"grouped: block-diagonal with {groups} groups after "
                          "reordering channels, but its input and output channels are tied "
                          "(a residual around it): one reordering would move both sides")
                return None
            for axis, order in ((1, in_order), (0, out_order)):
                found = co.reorder_edits(deps, node.name, axis, order)
                if isinstance(found, str):
                    plan.skip(node.name, f"grouped: block-diagonal with {groups} groups after "
                              f"reordering channels, but {found}")
                    return None
                edits += found.edits
                claims |= found.nodes
                touched_groups |= found.groups
            weight = weight[out_order][:, in_order]
            bias = None if bias is None else bias[out_order]
            detail["reordered"] = True
        layer = Layer(OpKind.CONV, cm.to_grouped(weight, groups), bias, groups,
                      *conv_geometry(node))
        kind = "depthwise" if groups == weight.shape[1] else "grouped"
        return _Candidate(node.name, (sc.node_layer(view, node),), (layer,), in_shape,
                          [*edits, ReplaceWithChain(node.name, (layer,))], claims,
                          f"to_{kind}", {"node": node.name, "rewrite": kind, "groups": groups,
                                         **detail}, touched_groups)

    def _merge(self, view, first, in_shape, plan) -> _Candidate | None:
        users = view.users(first.output)
        if len(users) != 1 or view.is_graph_output(first.output):
            return None
        second = users[0]
        if not _is_pointwise(second) or \
                second.kind is not first.kind and first.kind is OpKind.LINEAR:
            return None
        if first.kind is OpKind.CONV and (first.attrs.get("groups", 1) != 1 or
                                          first.attrs.get("pads") is None):
            return None
        if not in_shape:
            plan.skip(first.name, "merge: input shape unknown")
            return None
        get = view.param
        w, b = cm.merge_pointwise(get(first.name, "weight"),
                                  get(first.name, "bias") if "bias" in first.params else None,
                                  get(second.name, "weight"),
                                  get(second.name, "bias") if "bias" in second.params else None)
        geometry = conv_geometry(first) if first.kind is OpKind.CONV else ()
        merged = Layer(first.kind, w, b, 1, *geometry)
        pair = (sc.node_layer(view, first), sc.node_layer(view, second))
        before, after = chain_macs(pair, in_shape), chain_macs((merged,), in_shape)
        if after >= before:
            plan.skip(first.name, f"merge with '{second.name}': {after} MACs merged vs {before} "
                      "for the pair, not cheaper")
            return None
        return _Candidate(first.name, pair, (merged,), in_shape,
                          [ReplaceWithChain(first.name, (merged,)), Bypass(second.name)],
                          {first.name, second.name}, "merged",
                          {"node": first.name, "rewrite": "merge", "with": second.name,
                           "macs_before": before, "macs_after": after})

    def _form(self, view, node, in_shape, plan) -> _Candidate | None:
        if not in_shape:
            return None
        if "to-matmul" in self.rewrites and node.kind is OpKind.CONV:
            if not _is_pointwise(node) or len(in_shape) != 4 or node.attrs.get("form"):
                return None
            form = "gemm" if in_shape[2:] == (1, 1) else "matmul"
        elif "to-conv" in self.rewrites and node.attrs.get("form") == "matmul":  # fx's to-matmul
            layer = sc.node_layer(view, node)
            return _Candidate(node.name, (sc.node_layer(view, node, form="matmul"),), (layer,),
                              in_shape, [ReplaceWithChain(node.name, (layer,))], {node.name},
                              "matmul_to_conv", {"node": node.name, "rewrite": "matmul-to-conv",
                                                 "nodes": [node.name]})
        elif "to-conv" in self.rewrites and node.kind is OpKind.LINEAR and \
                not node.attrs.get("form"):
            if len(in_shape) != 2:
                plan.skip(node.name, f"to-conv: input {list(in_shape)} is not (N, C)")
                return None
            form = "conv"
        else:
            return None
        layer = sc.node_layer(view, node, form=form)
        return _Candidate(node.name, (sc.node_layer(view, node),), (layer,), in_shape,
                          [ReplaceWithChain(node.name, (layer,))], {node.name}, f"to_{form}",
                          {"node": node.name, "rewrite": f"to-{form}"})
