"""Test helpers for channel pruning: make units dead, then prune them, and compare.

A unit is dead when every weight that reads it (consumer slices) and every weight that produces
it (producer rows and biases of conv / linear layers) is zero: removing it then cannot change the
model's outputs, whatever the rest of the graph does. If ChannelDeps missed a coupling, pruning
either fails on a shape mismatch or changes the outputs: the decisive test of propagation.
"""

from __future__ import annotations

import numpy as np

from graphslim.analyses.channels import ChannelDeps, ParamSite, build_channel_deps
from graphslim.edits import SetParam
from graphslim.ir import WEIGHTED, OpKind
from graphslim.passes.prune_channels import pruning_edits
from graphslim.verify import make_inputs


def choose_units(deps: ChannelDeps, fraction: float, seed: int = 0, exact_only: bool = True
                 ) -> np.ndarray:
    """A random `fraction` of the units of every prunable (exact) group, at least one unit kept."""
    rng = np.random.default_rng(seed)
    removed = []
    for g in deps.prunable:
        if exact_only and g.inexact:
            continue
        n = min(g.size - 1, max(1, int(round(g.size * fraction))))
        if n > 0:
            removed.append(rng.choice(g.units, size=n, replace=False))
    return np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)


def dead_unit_edits(model, deps: ChannelDeps, removed: np.ndarray) -> list[SetParam]:
    view = model.view()
    values: dict[tuple[str, str], np.ndarray] = {}
    for site in deps.sites:
        if not isinstance(site, ParamSite):
            continue
        node = view.node(site.node)
        if node.kind not in WEIGHTED and node.kind is not OpKind.ATTENTION:
            continue
        out_axis = 1 if node.kind is OpKind.CONV_TRANSPOSE and site.role == "weight" else 0
        if not site.consumer and site.axis != out_axis:
            continue
        dead = ~deps.keep_mask(site.ids, removed)
        if not dead.any():
            continue
        key = (site.node, site.role)
        arr = values.get(key)
        if arr is None:
            arr = view.param(site.node, site.role)
        index = [slice(None)] * arr.ndim
        index[site.axis] = np.flatnonzero(dead)
        arr[tuple(index)] = 0
        values[key] = arr
    return [SetParam(n, r, v) for (n, r), v in values.items()]


def prune_dead_and_compare(model, fraction: float = 0.3, seed: int = 0, heads: bool = False):
    """Kill a random share of every exact group's units, prune exactly those, compare outputs.
    Returns (reference outputs, pruned outputs, deps, number of units removed, pruned model)."""
    deps = build_channel_deps(model.view(), model.infer_shapes(), heads=heads)
    removed = choose_units(deps, fraction, seed)
    dead = model.copy()
    dead.apply(dead_unit_edits(dead, deps, removed))
    feeds = make_inputs(dead.input_specs(), seed=seed)
    ref = dead.run(feeds)
    pruned = dead.copy()
    pruned.apply(pruning_edits(deps, removed))
    pruned.check()
    got = pruned.run(feeds)
    return list(ref.values()), list(got.values()), deps, len(removed), pruned
