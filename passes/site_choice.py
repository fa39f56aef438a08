"""Choosing a rewrite per site by measured latency (`choose=latency`), shared by the
conv-substitute family: the site as it is and as it would be, each timed on ONNX Runtime CPU
in layout context (graphslim/sites.py: between identity depthwise convs that keep ORT's NCHWc
layout, so a form that leaves the layout pays the reorders it pays in the model), at the
model's batch or `batch`. A rewrite goes ahead only when it is at least `min-gain` faster; the
timings land in the site's details, a refusal in the skips with both timings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphslim.edits import Layer
from graphslim.ir import GraphView, Node, OpKind, conv_geometry
from graphslim.pass_manager import Pass, Plan

CHOOSERS = ("cost", "latency")


@dataclass(frozen=True)
class ChoosingPass(Pass):
    """Options of a pass that can choose its sites by latency: `choose` (cost | latency),
    `min-gain`, `batch` (0: the model's). Subclasses call super().__post_init__()."""

    choose: str = "cost"
    min_gain: float = 0.05
    batch: int = 0

    def __post_init__(self):
        if self.choose not in CHOOSERS:
            raise ValueError(f"choose must be one of {', '.join(CHOOSERS)}, not "
                             f"'{self.choose}'")
        if not 0 <= self.min_gain < 1 or self.batch < 0:
            raise ValueError("min-gain must be in [0, 1) and batch >= 0 (0: the model's)")

    def latency_allows(self, node: str, what: str, before: Sequence[Layer],
                       after: Sequence[Layer], in_shape: tuple | None, plan: Plan,
                       detail: dict) -> bool:
        """True with `choose=cost`; else whether the site measured min-gain faster."""
        return self.choose == "cost" or latency_allows(
            node, what, before, after, in_shape, self.batch, self.min_gain, plan, detail)


def latency_allows(node: str, what: str, before: Sequence[Layer], after: Sequence[Layer],
                   in_shape: tuple | None, batch: int, min_gain: float, plan: Plan,
                   detail: dict) -> bool:
    """Whether `after` runs at least `min_gain` faster than `before` at this site."""
    from graphslim.sites import measure_chain

    if not in_shape:
        plan.skip(node, f"{what}: input shape unknown, cannot be measured")
        return False
    shape = tuple(in_shape) if not batch else (batch, *in_shape[1:])
    t_before, t_after = measure_chain(before, after, shape, context=True)
    detail.update(ms_before=round(t_before.median * 1e3, 4),
                  ms_after=round(t_after.median * 1e3, 4), measured_shape=list(shape))
    if t_after.median <= (1 - min_gain) * t_before.median:
        return True
    plan.skip(node, f"{what}: measured {t_after} vs {t_before} on ORT CPU at input "
              f"{list(shape)}, not {min_gain:.0%} faster")
    return False


def node_layer(view: GraphView, node: Node, bias: bool = True, **kw) -> Layer:
    """The node as it is, as an edit-vocabulary Layer."""
    b = view.param(node.name, "bias") if bias and "bias" in node.params else None
    geometry = conv_geometry(node) if node.kind is OpKind.CONV else ()
    groups = node.attrs.get("groups", 1) if node.kind is OpKind.CONV else 1
    return Layer(node.kind, view.param(node.name, "weight"), b, groups, *geometry, **kw)
