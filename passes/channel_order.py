"""Reorder the channels of a layer's input or output and fold the reordering into every tensor
that carries those channels, so the model computes the same function.

Used by conv-substitute (a conv that is block-diagonal only after reordering) and conv-group
(grouping after the reordering that keeps the most weight inside the blocks). It reuses the
analysis pruning uses: ChannelDeps already knows, for a channel of any tensor, every parameter
slice that produces, scales or reads it (producer rows, norm parameters, consumer columns, a
flatten's channel x spatial expansion into a linear layer). Reordering one channel group is then
a gather with the same index order at each of those sites, which is what SliceParam does with
a non-ascending `keep` (a permutation keeps every position).

Refused, with the reason (never reordered on a guess): channels ChannelDeps blocks (graph inputs
and outputs, ops it cannot model), channels tied together into larger units (a grouped conv's
groups, attention heads), groups whose channels are also split, sliced or reshaped (those
sites keep offsets a reordering would break), and channels of several groups meeting in one
tensor (a concat: a reordering across its pieces cannot be folded into either side).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analyses.channels import ChannelDeps, GroupCountSite, ParamSite, SplitSite
from graphslim.edits import SliceParam


@dataclass
class Reorder:
    """The edits for one reordering, the nodes they touch and the channel group reordered."""

    edits: list[SliceParam]
    nodes: set[str]
    groups: set[int]


def _own_site(deps: ChannelDeps, node: str, axis: int) -> ParamSite | None:
    return next((s for s in deps.sites if isinstance(s, ParamSite) and s.node == node
                 and s.role == "weight" and s.axis == axis), None)


def groups_of(deps: ChannelDeps, node: str, axis: int) -> set[int]:
    """Indices of the channel groups `node`'s weight axis `axis` holds channels of."""
    site = _own_site(deps, node, axis)
    if site is None:
        return set()
    return {deps.group_of(int(u)).index for u in np.unique(deps.units_of(site.ids))}


def reorderable(deps: ChannelDeps, node: str, axis: int):
    """(units, group) of `node`'s weight axis `axis` (1: input channels, 0: output channels) if
    those channels can be reordered as a whole, else a string saying why not."""
    side = "input" if axis == 1 else "output"
    site = _own_site(deps, node, axis)
    if site is None:
        return (f"its {side} channels come from a graph input or an op the channel analysis "
                "does not follow")
    units = deps.units_of(site.ids)
    if len(np.unique(units)) != len(units):
        return f"its {side} channels are tied into larger units (grouped conv or heads)"
    group = deps.group_of(int(units[0]))
    if not group.prunable:
        return f"its {side} channels cannot be reordered: {group.blocked[0]}"
    if len(units) != group.size or not np.isin(group.units, units).all() or \
            any(deps.group_of(int(u)).index != group.index for u in units):
        return f"its {side} channels are part of a larger tensor (a concat or a slice)"
    for s, ids, _ in _group_sites(deps, group):  # each must be a plain 1-D parameter axis
        if not isinstance(s, ParamSite):
            return f"'{s.node}' splits, slices or reshapes these channels"
        if s.node != node and ids.ndim != 1:
            return f"'{s.node}' holds these channels in a multi-axis block"
    return units, group


def _group_sites(deps: ChannelDeps, group):
    """(site, ids, in_group mask) of every site holding some of the group's channels; group
    counts are left out (one unit per group here, so a reordering does not change them)."""
    for s in deps.sites:
        ids = np.concatenate([np.ravel(p) for p in s.pieces]) if isinstance(s, SplitSite) \
            else s.ids
        in_group = np.isin(deps.units_of(np.ravel(ids)), group.units)
        if in_group.any() and not isinstance(s, GroupCountSite):
            yield s, ids, in_group


def reorder_edits(deps: ChannelDeps, node: str, axis: int, order: np.ndarray) -> Reorder | str:
    """Edits that make channel j of `node`'s weight axis `axis` (1: its input channels, 0: its
    output channels) the current channel order[j], everywhere those channels live except in
    `node` itself (the caller rewrites it). A string says why it cannot be done."""
    order = np.asarray(order, dtype=np.int64)
    if np.array_equal(order, np.arange(len(order))):
        return Reorder([], set(), set())
    found = reorderable(deps, node, axis)
    if isinstance(found, str):
        return found
    units, group = found
    rank = dict(zip(units[order].tolist(), range(len(units))))
    edits, nodes = [], set()
    for s, ids, in_group in _group_sites(deps, group):
        if s.node == node:  # reorderable() checked every site is a 1-D parameter axis
            continue
        positions = np.flatnonzero(in_group)
        keys = np.asarray([rank[u] for u in deps.units_of(ids[positions]).tolist()])
        new = np.arange(len(ids))
        new[positions] = positions[np.argsort(keys, kind="stable")]
        if not np.array_equal(new, np.arange(len(ids))):
            edits.append(SliceParam(s.node, s.role, s.axis, new))
            nodes.add(s.node)
    return Reorder(edits, nodes, {group.index})

