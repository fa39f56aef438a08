"""The records of ChannelDeps (see channels.py for the analysis): labels, the sites where
channels live, groups, the union-find, the operand and error types the rules share. At the bottom
of the channel modules: imports nothing of theirs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class Unsupported(Exception):
    """An op a rule cannot follow on the channels it carries (its inputs get blocked)."""


@dataclass
class Label:
    """ids over `axes` (ascending) of a value; ids.shape = the value's sizes on those axes."""

    axes: tuple[int, ...]
    ids: np.ndarray


@dataclass(frozen=True, eq=False)
class ParamSite:
    """Slice parameter `role` of `node` along `axis`: keep the positions whose id is kept.
    `consumer`: the slice reads the channel (a conv's input channels), as opposed to producing
    or scaling it; zeroing every consumer slice of a unit makes the unit dead."""

    node: str
    role: str
    axis: int
    ids: np.ndarray
    consumer: bool = False


@dataclass(frozen=True, eq=False)
class ShapeSite:
    """A Reshape (or view) whose target sizes on `axes` become the kept counts."""

    node: str
    axes: tuple[int, ...]
    ids: np.ndarray


@dataclass(frozen=True, eq=False)
class SplitSite:
    """A Split/chunk along a pruned axis: piece k keeps the kept ids of `pieces[k]`."""

    node: str
    axis: int
    pieces: tuple[np.ndarray, ...]


@dataclass(frozen=True, eq=False)
class SliceSite:
    """A Slice taking [start, stop) of a pruned axis whose ids (whole axis) are `ids`: the
    bounds become the kept counts before start and up to stop."""

    node: str
    axis: int
    ids: np.ndarray
    start: int
    stop: int


@dataclass(frozen=True, eq=False)
class GroupCountSite:
    """A grouped conv's `groups` or a GroupNorm's `num_groups`: ids shaped (groups, per group),
    a group counts as kept while any of its ids is."""

    node: str
    attr: str
    ids: np.ndarray


@dataclass
class ChannelGroup:
    """Units (union-find roots) that live in the same tensors, prunable together by one ratio."""

    index: int
    units: np.ndarray                    # root ids
    unit_sizes: dict[str, int]           # space -> ids per unit in that space
    spaces: list[str]                    # where the channels are created (producing nodes)
    blocked: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    def step(self, round_to: int) -> int:
        """Smallest number of units whose removal keeps every tensor a multiple of `round_to`."""
        step = 1
        for k in self.unit_sizes.values():
            step = math.lcm(step, round_to // math.gcd(round_to, k))
        return step


class UnionFind:
    """Union-find over integer ids, written here: unions come as arrays while labels propagate,
    and the rectangle step needs roots mid-way (scipy's DisjointSet is per-element Python as
    well; scipy.sparse.csgraph components would need every edge collected first). Roots for
    all ids at once are a vectorized pointer-jumping pass (`roots`)."""

    def __init__(self):
        self.parent: list[int] = []
        self.space: list[int] = []
        self.space_names: list[str] = []

    def new(self, shape, space: str) -> np.ndarray:
        start = len(self.parent)
        n = int(np.prod(shape, dtype=np.int64))
        self.parent.extend(range(start, start + n))
        self.space_names.append(space)
        self.space.extend([len(self.space_names) - 1] * n)
        return np.arange(start, start + n, dtype=np.int64).reshape(shape)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        a, b = a.ravel(), b.ravel()
        n = len(self.parent)
        keys = np.unique((a * n + b)[a != b])  # one int per pair: 1-D unique sorts fast
        for x, y in zip((keys // n).tolist(), (keys % n).tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def tie(self, ids: np.ndarray, axis: int) -> None:
        """Unite ids along `axis`: removal then takes whole lines along that axis."""
        if ids.shape[axis] > 1:
            self.unite(ids, ids.take([0], axis=axis))

    def roots(self) -> np.ndarray:
        p = np.asarray(self.parent, dtype=np.int64)
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


class ChannelDeps:
    """The result: groups, sites and the id -> unit map. Build with `build_channel_deps`."""

    def __init__(self, uf: UnionFind, sites: list, blocked: list, inexact: list,
                 rectangles: list, heads: bool, inexact_if_varying: list = ()):
        self.sites = sites
        _enforce_rectangles(uf, rectangles, heads)
        self.root = uf.roots()
        inexact = list(inexact)
        for ids, axis, reason in inexact_if_varying:  # does that axis shrink?
            if not _constant_along(self.root[ids], axis):
                inexact.append((ids, reason))
        self.space_names = uf.space_names
        self.groups = _make_groups(uf, self.root, blocked, inexact)
        self._group_of_unit = {int(u): g.index for g in self.groups for u in g.units}

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, unit: int) -> ChannelGroup:
        return self.groups[self._group_of_unit[int(self.root[unit])]]

    def units_of(self, ids: np.ndarray) -> np.ndarray:
        return self.root[np.asarray(ids, dtype=np.int64)] if np.size(ids) else \
            np.asarray(ids, dtype=np.int64)

    def keep_mask(self, ids: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """True where the id's unit is not in `removed` (an array of root ids)."""
        return ~np.isin(self.units_of(ids), removed)

    def summary(self) -> dict:
        return {"groups": len(self.groups), "prunable": len(self.prunable),
                "channels": int(sum(g.size for g in self.prunable)),
                "inexact": sum(1 for g in self.prunable if g.inexact)}


def _enforce_rectangles(uf: UnionFind, rectangles: list[np.ndarray], heads: bool) -> None:
    """Make every multi-axis block prunable only by whole lines: already so if units are constant
    along all axes but one; else tie along all but the free axis (outer with `heads`, else the
    inner one). Ties can break other blocks' shape, so iterate to a fixed point."""
    for _ in range(len(rectangles) + 1):
        changed = False
        root = uf.roots()
        for ids in rectangles:
            units = root[ids]
            free = [a for a in range(ids.ndim)
                    if all(_constant_along(units, b) for b in range(ids.ndim) if b != a)]
            if free:
                continue
            keep = 0 if heads else ids.ndim - 1
            for b in range(ids.ndim):
                if b != keep:
                    uf.tie(ids, b)
            changed = True
        if not changed:
            return


def _constant_along(units: np.ndarray, axis: int) -> bool:
    return units.shape[axis] == 1 or bool(np.all(units == units.take([0], axis=axis)))


def _make_groups(uf: UnionFind, root: np.ndarray, blocked: list, inexact: list
                 ) -> list[ChannelGroup]:
    """Groups = connected spaces: two spaces whose ids share a unit are in one group."""
    space = np.asarray(uf.space, dtype=np.int64)
    n_spaces = len(uf.space_names)
    sp_parent = list(range(n_spaces))

    def find(a):
        while sp_parent[a] != a:
            sp_parent[a] = sp_parent[sp_parent[a]]
            a = sp_parent[a]
        return a

    keys = np.unique(space * n_spaces + space[root])
    for a, b in zip((keys // n_spaces).tolist(), (keys % n_spaces).tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            sp_parent[max(ra, rb)] = min(ra, rb)
    group_of_space = np.asarray([find(s) for s in range(n_spaces)], dtype=np.int64)
    units = np.unique(root)
    unit_group = group_of_space[space[units]]
    order = np.unique(unit_group)
    index = {int(g): i for i, g in enumerate(order)}
    groups = []
    # ids per unit per space: count (unit, space) pairs
    pair, counts = np.unique(root * n_spaces + space, return_counts=True)
    sizes: dict[int, dict[str, int]] = {}
    for s, c in zip((pair % n_spaces).tolist(), counts.tolist()):
        d = sizes.setdefault(index[int(group_of_space[s])], {})
        name = uf.space_names[s]
        d[name] = max(d.get(name, 0), c)
    for g in order.tolist():
        i = index[g]
        member_spaces = [uf.space_names[s] for s in np.flatnonzero(group_of_space == g)]
        groups.append(ChannelGroup(i, units[unit_group == g], sizes.get(i, {}), member_spaces))
    for target, records in ((lambda gr: gr.blocked, blocked), (lambda gr: gr.inexact, inexact)):
        for ids, reason in records:
            if np.size(ids) == 0:
                continue
            for gi in np.unique(group_of_space[space[root[np.ravel(ids)]]]).tolist():
                lst = target(groups[index[int(gi)]])
                if reason not in lst:
                    lst.append(reason)
    return groups


@dataclass
class Operand:
    shape: tuple            # aligned to the op's (virtual) output rank
    label: Label | None     # axes already aligned
    const: tuple | None     # (node, role, param key, param rank) of a sliceable constant

