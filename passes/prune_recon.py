"""`recon` importance for prune-channels: remove the channels the next layer can best do without.

Data-driven channel selection (ThiNet, Luo et al. 2017; He et al. 2017's LASSO selection; here
in the Optimal Brain Surgeon form of group removal): a unit's cost is how much the output of
every layer that reads it changes when the unit's input features are removed and the layer's
remaining weights are refit by least squares to make up for them, on calibration data. That is
the error `reconstruct` can not take back, where l1 / taylor rank by what a channel is worth
before any refit.

For a consumer y = W^T x with input Gram matrix G = X^T X (sampled patches / rows, a constant
feature for the bias), the least-squares error after removing a block b of features from the
optimal weights W* (start: the layer's own W) is tr(W*_b^T (P_bb)^-1 W*_b), P = (G + lam I)^-1,
and removing it updates W*_S -= P_Sb P_bb^-1 W*_b, P_SS -= P_Sb P_bb^-1 P_bS (the OBS
downdate). Units of a group are removed greedily, a few at a time (a tenth of the ones left,
batched BLAS), the error of each consumer divided by its output energy and summed over the
group's consumers; a unit's score is the total relative error once it is gone, so the units
removed first rank lowest, whatever ratio is asked later (the target-macs bisection reuses one
order). Consumers are convs with one group and resolved padding, and linear layers, with at most
_MAX_FEATURES input features; a group with none of them is ranked by l1 (noted).

Hand-written: no library ranks structured groups by refit error (Torch-Pruning and NNI rank by
weights or gradients; OBC / SparseGPT's code is unstructured or per layer, in torch).
"""

from __future__ import annotations

import numpy as np

from graphslim import data as data_mod
from graphslim.analyses.activations import data_or_synthetic
from graphslim.analyses.channels import ChannelDeps, ParamSite
from graphslim.ir import GraphView, Node, OpKind, conv_geometry
from graphslim.passes import reconstruct_math as rm

#: consumer input features above which its Gram matrix (F^2 float64) is not built
_MAX_FEATURES = 8192
#: damping of G, relative to its mean diagonal (SparseGPT uses 1%; at 1% the copies of
#: tests/test_prune_recon.py score 0.002 instead of ~0, and PP-OCR's agreement was 0.88, not 0.90)
_DAMP = 1e-3
#: sampled output positions (conv) per calibration sample and consumer
_ROWS = 256


def consumers(view: GraphView, deps: ChannelDeps, groups) -> dict[int, list[ParamSite]]:
    """Per group index, the consumer weight sites the criterion can model."""
    wanted = {g.index for g in groups}
    out: dict[int, list[ParamSite]] = {}
    for site in deps.sites:
        if not (isinstance(site, ParamSite) and site.consumer and site.role == "weight"
                and site.axis == 1):
            continue
        node = view.node(site.node)
        if not _modelled(node) or _features(view, node) > _MAX_FEATURES:
            continue
        units = np.unique(deps.units_of(site.ids))
        for gi in {deps.group_of(int(u)).index for u in units.tolist()} & wanted:
            out.setdefault(gi, []).append(site)
    return out


def _modelled(node: Node) -> bool:
    if node.kind is OpKind.LINEAR:
        return True
    a = node.attrs
    return (node.kind is OpKind.CONV and int(a.get("groups", 1)) == 1 and a.get("pads")
            is not None and a.get("padding_mode", "zeros") == "zeros")


def _features(view: GraphView, node: Node) -> int:
    w = view.param(node.name, "weight")
    return int(np.prod(w.shape[1:])) + 1


def input_grams(view: GraphView, model, source, specs, nodes: list[Node], seed: int
                ) -> dict[str, rm.Normal]:
    """X^T X of each node's input rows (patches for convs, a constant 1 last), streamed over
    the calibration batches, `_ROWS` random output positions per sample."""
    rng = np.random.default_rng(seed)
    grams = {n.name: rm.Normal(1, _features(view, n), 1) for n in nodes}
    values = sorted({n.inputs[0] for n in nodes})
    for feeds in data_mod.batches(source, specs):
        acts = model.capture(feeds, values)
        for n in nodes:
            x = np.asarray(acts[n.inputs[0]])
            if n.kind is OpKind.CONV:
                strides, pads, dilations = conv_geometry(n)
                kernel = tuple(n.attrs["kernel_shape"])
                out = rm.conv_output_size(x.shape[2:], kernel, strides, pads, dilations)
                where = rm.sample_positions(x.shape[0], out, _ROWS, rng)
                rows = rm.patch_rows(x, kernel, strides, pads, dilations, 1, where)
            else:
                rows = x.reshape(-1, 1, x.shape[-1])
            rows = rm.with_ones(rows)
            grams[n.name].add(rows, np.zeros((len(rows), 1, 1), np.float32))
    for g in grams.values():
        g.flush()
    return grams


def recon_scores(view: GraphView, deps: ChannelDeps, analyses, plan, groups
                 ) -> dict[int, float] | None:
    """Scores of the units of `groups` that have a modelled consumer; None for none at all."""
    by_group = consumers(view, deps, groups)
    if not by_group:
        return None
    source, synthetic = data_or_synthetic(analyses, "recon channel selection")
    nodes = {s.node: view.node(s.node) for sites in by_group.values() for s in sites}
    grams = input_grams(view, analyses.model, source, analyses.model.input_specs(),
                        list(nodes.values()), seed=0)
    scores: dict[int, float] = {}
    for g in groups:
        sites = by_group.get(g.index)
        if not sites:
            continue
        problems = [_Consumer(view, nodes[s.node], s, deps, g.units, grams[s.node].gram[0])
                    for s in sites]
        scores.update(greedy_order(g.units, problems))
    plan.notes.append(f"recon: channels ranked by the refit error of their {len(nodes)} "
                      "consumer layers" + (" on SYNTHETIC inputs" if synthetic else ""))
    return scores


class _Consumer:
    """One consumer layer's OBS state: the inverse damped Gram matrix and optimal weights over
    the features still present, and which features each candidate unit owns."""

    def __init__(self, view: GraphView, node: Node, site: ParamSite, deps: ChannelDeps,
                 units: np.ndarray, gram: np.ndarray):
        w = view.param(node.name, "weight")
        per = int(np.prod(w.shape[2:]))  # kernel offsets per input channel
        w = np.asarray(w, np.float64).reshape(w.shape[0], -1).T  # (F - 1, O)
        bias = view.param(node.name, "bias") if view.has_param(node.name, "bias") else None
        b = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64)
        self.w = np.vstack([w, b[None]])  # (F, O): features as patch_rows orders them, 1 last
        damp = _DAMP * max(float(np.trace(gram)) / len(gram), 1e-12)
        self.energy = max(float(((gram @ self.w) * self.w).sum()), 1e-30)  # tr(W^T G W)
        self.p = np.linalg.inv(gram + damp * np.eye(len(gram)))
        owner = deps.units_of(site.ids)  # unit of each input channel
        self.blocks: dict[int, np.ndarray] = {}
        for u in np.intersect1d(np.unique(owner), units).tolist():
            chans = np.flatnonzero(owner == u)
            self.blocks[u] = (chans[:, None] * per + np.arange(per)[None]).reshape(-1)
        self.alive = np.arange(len(gram))  # feature ids of the rows of p and w

    def costs(self, units: list[int]) -> np.ndarray:
        """Relative output error of removing each unit alone from the current state."""
        out = np.zeros(len(units))
        pos = {f: i for i, f in enumerate(self.alive.tolist())}
        mine = [(k, u) for k, u in enumerate(units) if u in self.blocks]
        by_size: dict[int, list] = {}
        for k, u in mine:
            by_size.setdefault(len(self.blocks[u]), []).append((k, u))
        for items in by_size.values():  # batched over units with blocks of one size
            idx = np.asarray([[pos[f] for f in self.blocks[u]] for _, u in items])
            pbb = self.p[idx[:, :, None], idx[:, None, :]]       # (n, b, b)
            wb = self.w[idx]                                     # (n, b, O)
            err = np.einsum("nbo,nbo->n", wb, np.linalg.solve(pbb, wb))
            out[[k for k, _ in items]] = err / self.energy
        return out

    def remove(self, units: list[int]) -> None:
        feats = [f for u in units if u in self.blocks for f in self.blocks[u].tolist()]
        if not feats:
            return
        gone = np.isin(self.alive, feats)
        b, s = np.flatnonzero(gone), np.flatnonzero(~gone)
        psb = self.p[np.ix_(s, b)]
        inv = np.linalg.inv(self.p[np.ix_(b, b)])
        self.w = self.w[s] - psb @ (inv @ self.w[b])
        self.p = self.p[np.ix_(s, s)] - psb @ inv @ psb.T
        self.alive = self.alive[s]


def greedy_order(units: np.ndarray, problems: list[_Consumer]) -> dict[int, float]:
    """Backward elimination of the units; score = total relative error once a unit is gone
    (non-decreasing in removal order). The last unit scores the error of removing it too."""
    left = [int(u) for u in units]
    total, scores = 0.0, {}
    while left:
        costs = sum(p.costs(left) for p in problems)
        order = np.argsort(costs, kind="stable")
        take = [left[i] for i in order[:max(1, len(left) // 10)]]
        for i in order[:len(take)]:
            scores[left[i]] = total + float(costs[i])
        total += float(costs[order[:len(take)]].sum())
        if len(take) < len(left):
            for p in problems:
                p.remove(take)
        gone = set(take)
        left = [u for u in left if u not in gone]
    return scores
