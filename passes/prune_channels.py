"""prune-channels: remove whole channels, features and attention heads; a smaller dense model.

Algorithm: ChannelDeps (graphslim/analyses/channels.py) groups the channel slots that must go
together; every unit of a prunable group gets an importance (passes/prune_math.py), and the
lowest units are removed by one plan of SliceParam / SetAttr edits that slices every coupled
tensor consistently: producer rows and biases, norm parameters, consumer input columns (with the
channel x spatial expansion of a flatten), layer-scale constants, reshape target sizes, split
sizes and group counts.

How much: `ratio` (fraction of each group's units, `scope=local`; or one ranking across groups,
scores normalized by each group's mean, `scope=global`), `ratios` (per group,
`NODE-PATTERN:RATIO;...`, matched against the nodes that create a group's channels; groups no
pattern matches take `ratio`), `target-macs` / `target-params` (a fraction of the original; the
ratio is bisected on a cost estimate, the result measured), or `target-latency` (a fraction of
the original's latency measured on ONNX Runtime CPU at `threads`: per-group ratios chosen on
measured latency and sensitivity, passes/prune_latency.py, and written into the decided
pipeline as `ratios`, so the result reproduces elsewhere without measuring). Kept
counts are rounded so every tensor keeps a multiple of `round-to` channels, at least
`min-channels`. `round-to=0` (default) takes ONNX Runtime's NCHWc channel block on this CPU: 16
with AVX-512, else 8 (FIELD-NOTES: off-multiple counts fall out of the blocked layout; measured
here, mobilenet_v2 at ratio 0.5 ran 2.37x faster rounded to 8 and 2.78x rounded to 16).

Criteria: `l1`, `l2` (weight slice norms, summed over the group's tensors), `bn-scale` (|gamma|
of the group's BatchNorms, network slimming; groups without one fall back to l1, noted),
`taylor` (first-order Taylor, Molchanov et al. 2017: |sum w dL/dw| on the user's data with
gradients from torch, fx frontend; on ONNX an activation-based proxy, sum over consumer slices of
||W_c|| x mean |x_c|, stated in the notes), `random` (ablations).

Never pruned: blocked groups (model outputs, ops ChannelDeps cannot model: each skip names the
reason), `exclude`d nodes' groups, and with `exact-only` groups flagged inexact (LayerNorm over
the channels). Lossy: the pass manager reports the output error.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from graphslim.analyses.channels import (
    ChannelDeps,
    ChannelDepsAnalysis,
    ChannelGroup,
    GroupCountSite,
    HeadDepsAnalysis,
    ParamSite,
    ShapeSite,
    SliceSite,
    SplitSite,
)
from graphslim.analyses.cost import Cost
from graphslim.edits import Edit, SetAttr, SliceParam
from graphslim.ir import WEIGHTED, GraphView, OpKind
from graphslim.pass_manager import Pass, Plan, register_pass
from graphslim.passes import prune_math as pm
from graphslim.passes.prune_ratios import group_ratios, parse_ratios, ratio_entries

CRITERIA = ("l1", "l2", "bn-scale", "taylor", "recon", "random")


def pruning_edits(deps: ChannelDeps, removed: np.ndarray) -> list[Edit]:
    """The edits that remove `removed` (unit ids) everywhere they live."""
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    edits: list[Edit] = []
    for site in deps.sites:
        mask = deps.keep_mask(site.ids if not isinstance(site, SplitSite) else
                              np.concatenate(site.pieces), removed)
        if isinstance(site, ShapeSite):  # even unchanged: a run-time target read from another
            edits.append(SetAttr(site.node, "shape", _rect_sizes(site, mask)))  # tensor's
            continue  # Shape would follow that tensor's pruning; the frontend pins it
        if mask.all():
            continue
        if isinstance(site, ParamSite):
            edits.append(SliceParam(site.node, site.role, site.axis, np.flatnonzero(mask)))
        elif isinstance(site, SplitSite):
            sizes = [int(p.sum()) for p in np.split(mask, np.cumsum(
                [len(p) for p in site.pieces])[:-1])]
            if 0 in sizes:
                raise ValueError(f"prune-channels would empty a piece of split '{site.node}'")
            edits.append(SetAttr(site.node, "split", tuple(sizes)))
        elif isinstance(site, SliceSite):
            start, stop = int(mask[:site.start].sum()), int(mask[:site.stop].sum())
            if stop <= start:
                raise ValueError(f"prune-channels would empty slice '{site.node}'")
            edits.append(SetAttr(site.node, "slice", (site.axis, start, stop)))
        elif isinstance(site, GroupCountSite):
            edits.append(SetAttr(site.node, site.attr, int(mask.any(axis=1).sum())))
    return edits


def _rect_sizes(site: ShapeSite, mask: np.ndarray) -> dict[int, int]:
    per_axis = [mask.any(axis=tuple(b for b in range(mask.ndim) if b != a))
                for a in range(mask.ndim)]
    outer = per_axis[0]
    for m in per_axis[1:]:
        outer = np.multiply.outer(outer, m)
    if not np.array_equal(np.asarray(outer, dtype=bool).reshape(mask.shape), mask):
        raise ValueError(f"prune-channels: kept channels at reshape '{site.node}' are not a "
                        "rectangle (a ChannelDeps invariant was broken)")
    return {a: int(m.sum()) for a, m in zip(site.axes, per_axis)}


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    name = "prune-channels"
    lossless = False
    summary = "remove whole channels / features / heads, slicing every coupled tensor"

    ratio: float = 0.0
    ratios: tuple[str, ...] = ()
    target_macs: float = 0.0
    target_params: float = 0.0
    target_latency: float = 0.0
    criterion: str = "l1"
    scope: str = "local"
    round_to: int = 0
    min_channels: int = 8
    exclude: tuple[str, ...] = ()
    heads: bool = False
    exact_only: bool = False
    seed: int = 0
    threads: int = 1  # ORT intra-op threads target-latency is measured at (0: all cores)

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), not {self.ratio}")
        for opt in ("target_macs", "target_params", "target_latency"):
            v = getattr(self, opt)
            if not 0 <= v < 1:
                raise ValueError(f"{opt.replace('_', '-')} must be in (0, 1) (a fraction of the "
                                 f"original), not {v}")
        parse_ratios(self.ratios)
        targets = sum(1 for v in (self.target_macs, self.target_params, self.target_latency) if v)
        if targets > 1 or (targets and (self.ratio or self.ratios)):
            raise ValueError("give one of ratio / ratios, target-macs, target-params, "
                             "target-latency")
        if not (targets or self.ratio or self.ratios):
            raise ValueError("nothing to prune: give ratio=F (fraction of channels removed), "
                             "ratios=NODE:F;..., or target-macs=F, target-params=F or "
                             "target-latency=F (fraction of the original kept)")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: all cores)")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, "
                             f"not '{self.criterion}'")
        if self.scope not in ("local", "global"):
            raise ValueError(f"scope must be local or global, not '{self.scope}'")
        if self.round_to < 0 or self.min_channels < 1:
            raise ValueError("round-to must be >= 0 (0: this CPU's kernel block) and "
                             "min-channels >= 1")

    # --- plan ----------------------------------------------------------------------------------
    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        deps = analyses.get(HeadDepsAnalysis if self.heads else ChannelDepsAnalysis)
        groups = self._candidates(view, deps, plan)
        if not groups:
            plan.notes.append("no prunable channel group")
            return plan
        base = self.round_to
        if not base:
            from graphslim.runtime import cpu_channel_block

            base = cpu_channel_block()
            plan.notes.append(f"round-to {base}: ONNX Runtime's NCHWc channel block on this CPU")
            plan.decided["round_to"] = base  # the decided pipeline prunes the same elsewhere
        scores = self._scores(view, deps, analyses, plan, groups)
        per_group = group_ratios(groups, self.ratios, plan)
        if self.target_latency:
            from graphslim.passes.prune_latency import allocate

            def edits_for(ratios: dict[int, float]) -> list[Edit]:
                chosen = self._select(groups, scores, 0.0, base, ratios)
                return pruning_edits(deps, _keep_pieces_alive(deps, chosen, scores, Plan()))

            per_group = allocate(self, analyses, groups, edits_for, plan)
            plan.decided.update(target_latency=0.0, ratios=ratio_entries(groups, per_group))
        if self.ratio or per_group:
            removed = self._select(groups, scores, self.ratio, base, per_group)
        else:
            removed = self._budget(view, deps, analyses, groups, scores, plan, base)
        removed = _keep_pieces_alive(deps, removed, scores, plan)
        plan.edits.extend(pruning_edits(deps, removed))
        self._record(plan, deps, groups, removed)
        return plan

    def _candidates(self, view: GraphView, deps: ChannelDeps, plan: Plan) -> list[ChannelGroup]:
        matched: set[str] = set()
        out = []
        site_nodes: dict[int, set[str]] = {}
        for site in deps.sites:  # the nodes that produce or scale a group's channels
            if getattr(site, "consumer", False):
                continue  # excluding a layer keeps its outputs, not its inputs (as Torch-Pruning)
            ids = np.concatenate(site.pieces) if isinstance(site, SplitSite) else site.ids
            for u in np.unique(deps.units_of(np.ravel(ids))).tolist():
                site_nodes.setdefault(deps.group_of(u).index, set()).add(site.node)
        names = {n.name for n in view.nodes()}
        for g in deps.groups:
            nodes = site_nodes.get(g.index, set()) | set(g.spaces)
            if not g.prunable:
                if g.spaces[0] in names:
                    plan.skip(g.spaces[0], "; ".join(g.blocked[:3]))
                continue
            hits = {n for n in nodes for p in self.exclude if fnmatch.fnmatch(n, p)}
            if hits:
                matched |= hits
                plan.skip(g.spaces[0], f"excluded ({sorted(hits)[0]})")
                continue
            if self.exact_only and g.inexact:
                plan.skip(g.spaces[0], f"inexact: {g.inexact[0]}")
                continue
            out.append(g)
        if self.exclude and not matched:
            plan.notes.append(f"exclude patterns {list(self.exclude)} matched no node")
        return out

    # --- importance ----------------------------------------------------------------------------
    def _scores(self, view, deps: ChannelDeps, analyses, plan: Plan, groups) -> dict[int, float]:
        scores: dict[int, float] = {}
        if self.criterion == "random":
            rng = np.random.default_rng(self.seed)
            for g in groups:
                for u, s in zip(g.units.tolist(), rng.random(g.size).tolist()):
                    scores[u] = s
            return scores
        if self.criterion == "taylor":
            from graphslim.passes.prune_taylor import taylor_scores

            return taylor_scores(view, deps, analyses, plan)
        if self.criterion == "recon":
            from graphslim.passes.prune_recon import recon_scores

            l1 = PruneChannels._weight_scores(view, deps, "l1")[0]
            found = recon_scores(view, deps, analyses, plan, groups) or {}
            rest = [g for g in groups if not any(int(u) in found for u in g.units)]
            if rest:
                plan.notes.append(f"recon: {len(rest)} groups without a modelled consumer "
                                  "ranked by l1")
            return {**{int(u): l1.get(int(u), 0.0) for g in rest for u in g.units}, **found}
        scores, bn = PruneChannels._weight_scores(view, deps, self.criterion)
        if self.criterion == "bn-scale":
            fallback = [g for g in groups if not any(int(u) in bn for u in g.units)]
            if fallback:
                plan.notes.append(f"bn-scale: {len(fallback)} groups without a BatchNorm ranked "
                                  "by l1")
            for g in groups:
                if g not in fallback:
                    for u in g.units.tolist():
                        scores[u] = bn.get(u, 0.0)
        return scores

    @staticmethod
    def _weight_scores(view, deps: ChannelDeps, criterion: str) -> tuple[dict, dict]:
        """(weight-norm scores, |gamma| per unit where criterion is bn-scale)."""
        p = 2 if criterion == "l2" else 1
        scores: dict[int, float] = {}
        bn: dict[int, float] = {}
        for site in deps.sites:
            if not isinstance(site, ParamSite):
                continue
            node = view.node(site.node)
            if criterion == "bn-scale" and site.role == "scale" and \
                    node.kind is OpKind.BATCHNORM:
                pm.accumulate(deps.units_of(site.ids), np.abs(view.param(site.node, "scale")),
                              bn, normalize=False)
            if node.kind in WEIGHTED and site.role == "weight":
                arr = view.param(site.node, "weight")
                pm.accumulate(deps.units_of(site.ids), pm.slice_norms(arr, site.axis, p), scores)
        return scores, bn

    # --- selection -----------------------------------------------------------------------------
    def _select(self, groups: list[ChannelGroup], scores: dict, ratio: float, base: int,
                overrides: dict[int, float] | None = None) -> np.ndarray:
        """Units removed at `ratio` (per group: `overrides`, group index -> ratio, first)."""
        per_group = {}
        if self.scope == "global":
            pool = []
            for g in groups:
                vals = np.asarray([scores.get(int(u), 0.0) for u in g.units])
                mean = vals.mean() if vals.size and vals.mean() > 0 else 1.0
                if self.criterion == "recon":  # relative output errors: comparable as they are
                    mean = 1.0
                pool.extend((v / mean, g.index) for v in vals)
            pool.sort()
            n_remove = int(len(pool) * ratio)
            counts: dict[int, int] = {}
            for _, gi in pool[:n_remove]:
                counts[gi] = counts.get(gi, 0) + 1
            per_group = {g.index: counts.get(g.index, 0) / g.size for g in groups}
        removed = []
        for g in groups:
            r = per_group.get(g.index, ratio) if self.scope == "global" else ratio
            r = overrides.get(g.index, r) if overrides else r
            step = g.step(base)
            min_unit = min(g.unit_sizes.values()) if g.unit_sizes else 1
            min_keep = -(-self.min_channels // max(1, min_unit))
            keep = pm.keep_count(g.size, r, step, min_keep)
            removed.append(pm.lowest(g.units, scores, g.size - keep))
        return np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)

    def _budget(self, view, deps, analyses, groups, scores, plan: Plan, base: int) -> np.ndarray:
        """Bisect the ratio until the estimated MACs / params meet the target."""
        cost = analyses.get(Cost)
        metric = "macs" if self.target_macs else "params"
        target = self.target_macs or self.target_params
        terms = _cost_terms(view, deps, cost, metric)
        total = cost.macs if metric == "macs" else cost.params

        def estimate(removed):
            saved = sum(c * (1 - np.prod([deps.keep_mask(ids, removed).mean() for ids in idss]))
                        for c, idss in terms)
            return (total - saved) / max(total, 1)

        lo, hi = 0.0, 0.95
        best = self._select(groups, scores, hi, base)
        if estimate(best) > target:
            raise ValueError(f"target-{metric}={target} cannot be met: pruning every prunable "
                            f"group at 0.95 leaves {estimate(best):.3f} of the {metric}")
        for _ in range(16):
            mid = (lo + hi) / 2
            removed = self._select(groups, scores, mid, base)
            if estimate(removed) <= target:
                hi, best = mid, removed
            else:
                lo = mid
        plan.notes.append(f"target-{metric}={target}: ratio {hi:.3f}, estimated "
                          f"{estimate(best):.3f} of the original")
        return best

    def _record(self, plan: Plan, deps: ChannelDeps, groups, removed: np.ndarray) -> None:
        removed_set = set(np.asarray(removed).tolist())
        for g in groups:
            gone = sum(1 for u in g.units.tolist() if u in removed_set)
            if gone:
                plan.stats["groups_pruned"] += 1
                plan.stats["units_removed"] += gone
                plan.details.append({"group": g.index, "spaces": g.spaces[:4],
                                     "units_before": g.size, "units_after": g.size - gone,
                                     "inexact": bool(g.inexact)})
        plan.stats["groups_prunable"] = len(deps.prunable)
        plan.stats["groups_blocked"] = len(deps.groups) - len(deps.prunable)


def _keep_pieces_alive(deps: ChannelDeps, removed: np.ndarray, scores: dict, plan: Plan
                       ) -> np.ndarray:
    """A split or slice piece may not lose every channel: give back its best unit."""
    gone = set(np.asarray(removed).tolist())
    for site in deps.sites:
        if isinstance(site, SplitSite):
            pieces = site.pieces
        elif isinstance(site, SliceSite):
            pieces = (site.ids[site.start:site.stop],)
        else:
            continue
        for piece in pieces:
            units = np.unique(deps.units_of(piece)).tolist()
            if units and all(u in gone for u in units):
                best = max(units, key=lambda u: scores.get(u, 0.0))
                gone.discard(best)
                plan.notes.append(f"kept one unit of '{site.node}' so no piece is empty "
                                  "(its channel count may leave the round-to multiple)")
    return np.asarray(sorted(gone), dtype=np.int64)


def _cost_terms(view: GraphView, deps: ChannelDeps, cost, metric: str) -> list:
    """(cost of a weighted node, [ids along each of its weight's pruned axes])."""
    by_node: dict[str, list] = {}
    for site in deps.sites:
        if isinstance(site, ParamSite) and site.role == "weight":
            by_node.setdefault(site.node, []).append(site.ids)
    terms = []
    for node, idss in by_node.items():
        c = cost.per_node.get(node)
        if c is not None:
            terms.append((c.macs if metric == "macs" else c.params, idss))
    return terms
