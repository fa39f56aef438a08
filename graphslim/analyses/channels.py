"""ChannelDeps: which channels of which tensors must be removed together.

Every prunable channel slot gets an integer id; ops unite ids that must go together (a residual add
unites the channels of both operands, a depthwise conv unites each input channel with its output
channels, ...). After propagation the connected components of that union-find are the atomic units
of pruning, and *groups* are the sets of units that live in the same tensors (e.g. every channel of
a resnet stage's residual stream). Removing a unit removes, consistently, every position labelled
with one of its ids: parameter slices (`ParamSite`), reshape target sizes (`ShapeSite`), split sizes
(`SplitSite`), slice bounds (`SliceSite`) and group counts (`GroupCountSite`).

A value's *label* covers a set of its axes: `ids[i, j, ...]` is the id of position (i, j, ...) on
those axes. Most labels cover the channel axis only; a flatten into a linear layer spreads one
channel over its H*W features (channel x spatial expansion); a reshape into attention heads or a
channel shuffle gives a label over two axes. Such a multi-axis block must stay rectangular after
pruning (a reshape needs whole rows or columns), which channel_types guarantees at the end
by tying ids along all but one axis: the inner axis by default (uniform head-dim / shuffle-column
pruning), the outer one with `heads=True` (whole attention heads).

Soundness over reach: an op this module has no rule for marks every id flowing into it blocked with
the op and reason, so nothing is ever pruned on a guess. Graph outputs are blocked (model outputs
keep their shape). Ops that mix channels in a way slicing cannot keep exact (LayerNorm over the
channels) leave their units prunable but flag them `inexact`.

The propagation rules per op live in graphslim/analyses/channel_rules.py.
"""

from __future__ import annotations

from graphslim.analyses import Analysis, AnalysisManager, Shapes
from graphslim.analyses.channel_rules import Propagation
from graphslim.analyses.channel_types import (  # noqa: F401  (the records, re-exported)
    ChannelDeps,
    ChannelGroup,
    GroupCountSite,
    Label,
    ParamSite,
    ShapeSite,
    SliceSite,
    SplitSite,
)


def build_channel_deps(view, shapes: dict[str, tuple], heads: bool = False) -> ChannelDeps:
    return Propagation(view, shapes, heads).run()


class ChannelDepsAnalysis(Analysis):
    """ChannelDeps with uniform head-dim pruning (the default of prune-channels)."""

    name = "channel-deps"

    @classmethod
    def compute(cls, am: AnalysisManager) -> ChannelDeps:
        return build_channel_deps(am.view, am.get(Shapes), heads=False)


class HeadDepsAnalysis(Analysis):
    """ChannelDeps pruning whole attention heads (`prune-channels{heads=true}`)."""

    name = "channel-deps-heads"

    @classmethod
    def compute(cls, am: AnalysisManager) -> ChannelDeps:
        return build_channel_deps(am.view, am.get(Shapes), heads=True)
