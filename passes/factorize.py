"""factorize: replace a layer by a chain of thinner layers whose product approximates it.

Methods (weight math in passes/lowrank_math.py): `svd` for Linear / Gemm / MatMul-with-constant-
weight and 1x1 convs, `tucker2` and `cp` for KxK convs, `spatial-svd` (KxK -> Kx1 then 1xK), and
`auto`, which picks per layer the applicable method with the lowest weight error per saved MAC.

Rank selection, first that applies: `target-macs` (whole-model MACs as a fraction of the
original; each layer gets the option minimising weight error - lambda x saved MACs, lambda
bisected to meet the budget), `vbmf` (empirical VBMF on the unfoldings, Kim et al. 2016),
`energy` (keep this share of the squared singular values), `rank` (a fraction of the full rank
if <= 1, else absolute).

`data-aware=true` (SVD of linear / 1x1 layers): the decomposition minimises the layer's output
error on the user's data (`data=`; synthetic inputs otherwise, noted) by whitening with the
input second moment (activation statistics analysis), as ASVD / SVD-LLM do for transformers;
the reported error is then the relative output error on that data.

Ranks are rounded up to a multiple of `round-to`. A layer is factorized only where the chain
costs at most (1 - min-saving) of its MACs by the cost model and, with `measure=true`, where the
chain also runs faster than the layer on ONNX Runtime CPU, timed between identity convs that keep
ORT's blocked layout, as between the model's other convs (graphslim.sites; not used with
`target-macs`); `force` overrides both, for full-rank checks. Otherwise the layer is left with
the reason.

Lossy: the pass manager reports the output error; each factorized layer's method, ranks, MACs
before/after and relative weight error are in the plan's details. Grouped and depthwise convs are
skipped (with the reason); so are convs whose padding is not known ('same').
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from graphslim.analyses import Shapes
from graphslim.analyses.activations import LayerInputGram
from graphslim.analyses.cost import Cost, chain_macs
from graphslim.edits import Layer, ReplaceWithChain
from graphslim.ir import GraphView, Node, OpKind, conv_geometry
from graphslim.pass_manager import Pass, Plan, register_pass
from graphslim.passes import lowrank_math as lr
from graphslim.sites import measure_chain

METHODS = ("auto", "svd", "tucker2", "cp", "spatial-svd")
_BUDGET_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)

#: the `layers` option -> the kind it keeps
_LAYER_KINDS = {"conv": OpKind.CONV, "linear": OpKind.LINEAR}


@dataclass(frozen=True)
class _Site:
    node: Node
    weight: np.ndarray
    bias: np.ndarray | None
    in_shape: tuple
    macs: int


@dataclass(frozen=True)
class _Option:
    method: str
    ranks: tuple
    layers: tuple
    macs: int
    error: float
    error_kind: str = "weight_rel_error"


@register_pass
@dataclass(frozen=True)
class FactorizeLowRank(Pass):
    name = "factorize"
    lossless = False
    summary = "low-rank factorization: SVD, Tucker-2, CP, spatial SVD, with rank selection"
    method: str = "auto"
    rank: float = 0.5
    energy: float = 0.0
    vbmf: bool = False
    target_macs: float = 0.0
    round_to: int = 8
    min_saving: float = 0.1
    layers: str = "all"
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()  # node-name patterns: factorize these alone (sensitivity trials)
    hooi_iters: int = 0
    data_aware: bool = False
    measure: bool = False
    force: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if not self.rank > 0:
            raise ValueError(f"rank must be > 0 (a fraction <= 1 or an absolute rank), "
                             f"not {self.rank}")
        if not 0 <= self.energy <= 1:
            raise ValueError(f"energy must be in [0, 1], not {self.energy}")
        if not 0 <= self.target_macs < 1:
            raise ValueError(f"target-macs must be in [0, 1) (a fraction of the model's MACs), "
                             f"not {self.target_macs}")
        if self.layers != "all" and self.layers not in _LAYER_KINDS:
            raise ValueError(f"layers must be all, conv or linear, not '{self.layers}'")
        if self.round_to < 1:
            raise ValueError("round-to must be >= 1")

    # --- plan ----------------------------------------------------------------------------------
    def plan(self, view: GraphView, analyses) -> Plan:
        shapes = analyses.get(Shapes)
        plan = Plan()
        grams = analyses.get(LayerInputGram) if self.data_aware else {}
        if any(g.synthetic for g in grams.values()):
            plan.notes.append("data-aware SVD used synthetic inputs: pass data= for real ones")
        cache: dict = {"grams": grams}  # plan-local: decompositions and statistics
        sites = []
        for node in view.nodes():
            if node.kind not in (OpKind.CONV, OpKind.LINEAR) or not self._wanted(node):
                continue
            site_or_reason = _site(view, node, shapes)
            if isinstance(site_or_reason, str):
                plan.skip(node.name, site_or_reason)
            else:
                sites.append(site_or_reason)
        if self.exclude and not any(fnmatch.fnmatch(n.name, p) for p in self.exclude
                                    for n in view.nodes()):
            plan.notes.append(f"exclude patterns {list(self.exclude)} matched no node")
        if self.target_macs:
            chosen = self._budget(sites, plan, analyses.get(Cost).macs, cache)
        else:
            chosen = self._each(sites, plan, cache)
        for site, opt in chosen:
            plan.edits.append(ReplaceWithChain(site.node.name, opt.layers))
            plan.stats[f"factorized_{opt.method}"] += 1
            plan.stats["macs_saved"] += site.macs - opt.macs
            plan.details.append({"node": site.node.name, "method": opt.method,
                                 "ranks": list(opt.ranks), "macs_before": site.macs,
                                 "macs_after": opt.macs, opt.error_kind: round(opt.error, 6)})
        return plan

    def _wanted(self, node: Node) -> bool:
        if self.layers != "all" and node.kind is not _LAYER_KINDS[self.layers]:
            return False
        if self.only and not any(fnmatch.fnmatch(node.name, p) for p in self.only):
            return False
        return not any(fnmatch.fnmatch(node.name, p) for p in self.exclude)

    def _methods(self, site: _Site) -> list[str] | str:
        node, k = site.node, site.weight.shape[2:]
        pointwise = node.kind is OpKind.LINEAR or all(d == 1 for d in k)
        spatial = not pointwise and len(k) == 2
        allowed = {"svd": pointwise, "tucker2": spatial, "spatial-svd": spatial, "cp": spatial}
        if self.method != "auto":
            what = "x".join(map(str, k)) or "linear"
            return [self.method] if allowed[self.method] else \
                f"method {self.method} does not apply to a {what} layer"
        return [m for m in ("svd", "tucker2", "spatial-svd") if allowed[m]] or \
            "no factorization applies to this layer"

    def _each(self, sites: list[_Site], plan: Plan, cache: dict) -> list:
        chosen = []
        for site in sites:
            methods = self._methods(site)
            if isinstance(methods, str):
                plan.skip(site.node.name, methods)
                continue
            options = [self._option(site, m, None, cache) for m in methods]
            best = min(options, key=lambda o: o.error / max(site.macs - o.macs, 1))
            if not self.force and best.macs > (1 - self.min_saving) * site.macs:
                plan.skip(site.node.name, f"{best.method} at ranks {list(best.ranks)} costs "
                          f"{best.macs} MACs vs {site.macs}: saves less than "
                          f"{self.min_saving:.0%}")
                continue
            if self.measure and not self.force and not self._faster(site, best, plan):
                continue
            chosen.append((site, best))
        return chosen

    def _faster(self, site: _Site, opt: _Option, plan: Plan) -> bool:
        """Measured ORT latency of the layer and of its chain (1 thread), in layout context: a
        chain whose thin ranks fall out of ORT's NCHWc blocks pays the reorders it would pay in
        the model."""
        original = (_original_layer(site),)
        before, after = measure_chain(original, opt.layers, site.in_shape, context=True)
        if after.median < before.median:
            return True
        plan.skip(site.node.name, f"{opt.method} chain measured {after} vs {before} for the "
                  "layer on ORT CPU: not faster")
        return False

    def _budget(self, sites: list[_Site], plan: Plan, model_macs: int, cache: dict) -> list:
        """Per layer, the option (or none) minimising weight error - lam x saved MACs; lam is
        bisected (log scale) to the smallest value whose picks save what the target needs."""
        per_site = []
        for site in sites:
            methods = self._methods(site)
            if isinstance(methods, str):
                plan.skip(site.node.name, methods)
                continue
            opts = [self._option(site, m, f, cache) for m in methods for f in _BUDGET_FRACTIONS]
            opts = [o for o in opts if o.macs <= (1 - self.min_saving) * site.macs]
            if opts:
                per_site.append((site, opts))
            else:
                plan.skip(site.node.name, "no rank saves enough MACs")
        need = (1 - self.target_macs) * model_macs
        lo, hi = -30.0, 0.0
        while _saved(per_site, _pick(per_site, 10 ** hi)) < need and hi < 30:
            hi += 2
        if _saved(per_site, _pick(per_site, 10 ** hi)) < need:
            plan.notes.append(f"target-macs {self.target_macs} cannot be met by factorization "
                              "alone: every layer took its cheapest option")
        for _ in range(60):
            mid = (lo + hi) / 2
            short = _saved(per_site, _pick(per_site, 10 ** mid)) < need
            lo, hi = (mid, hi) if short else (lo, mid)
        picks = _pick(per_site, 10 ** hi)
        return [(site, opt) for (site, _), opt in zip(per_site, picks) if opt is not None]

    # --- one option -----------------------------------------------------------------------------
    def _option(self, site: _Site, method: str, fraction: float | None, cache: dict) -> _Option:
        """The chain for one method at the rank the selection rule (or `fraction`) gives. Bases
        are computed once per (layer, method) and sliced for every rank."""
        w, b = site.weight, site.bias
        key = (site.node.name, method)
        if method in ("svd", "spatial-svd"):
            if key not in cache:
                mat = w.reshape(w.shape[0], -1) if method == "svd" else lr.spatial_matrix(w)
                gram = cache["grams"].get(site.node.name) if method == "svd" else None
                cache[key] = lr.WhitenedSVDBasis(mat, gram.matrix, gram.rows) if gram else \
                    lr.SVDBasis(mat)
            basis = cache[key]
            full = min(basis.m.shape)
            r = self._select(basis.s, basis, full, fraction)
            a, bb = basis.factors(r)
            layers = (_pointwise_chain(site, bb, a, b) if method == "svd" else
                      _spatial_chain(site, *lr.spatial_layers(a, bb, w.shape), b))
            kind = "output_rel_error" if isinstance(basis, lr.WhitenedSVDBasis) else \
                "weight_rel_error"
            return _Option(method, (r,), layers, chain_macs(layers, site.in_shape),
                           basis.error(r), kind)
        if method == "tucker2":
            if key not in cache:
                cache[key] = lr.Tucker2Basis(w)
            basis = cache[key]
            r_out = self._select(basis.s_out, lr.unfold(w, 0), w.shape[0], fraction)
            r_in = self._select(basis.s_in, lr.unfold(w, 1), w.shape[1], fraction)
            if self.hooi_iters:
                (first, core, last), error = basis.refined(w, r_out, r_in, self.hooi_iters)
            else:
                first, core, last = basis.factors(r_out, r_in)
                error = basis.error(r_out, r_in)
            layers = _tucker_chain(site, first, core, last, b)
            return _Option(method, (r_out, r_in), layers, chain_macs(layers, site.in_shape),
                           error)
        full = min(w.shape[:2])
        r = lr.round_rank((fraction or self._fraction(full)) * full, full, self.round_to)
        (a, bb, c, d), recon = lr.cp_factors(w, r)
        layers = _cp_chain(site, a, bb, c, d, b)
        return _Option(method, (r,), layers, chain_macs(layers, site.in_shape),
                       lr.relative_error(w, recon))

    def _fraction(self, full: int) -> float:
        return self.rank if self.rank <= 1 else min(self.rank / full, 1.0)

    def _select(self, singular: np.ndarray, matrix, full: int, fraction: float | None) -> int:
        """Rank by, in order: an explicit fraction (budget grid), vbmf, energy, rank."""
        if fraction is not None:
            r = fraction * full
        elif self.vbmf:
            mat = matrix if isinstance(matrix, np.ndarray) else matrix.m
            r = lr.evbmf_rank(mat)
        elif self.energy:
            r = lr.energy_rank(singular, self.energy)
        else:
            r = self._fraction(full) * full
        return lr.round_rank(r, full, self.round_to)


def _pick(per_site: list, lam: float) -> list:
    picks = []
    for site, opts in per_site:
        best = min(opts, key=lambda o: o.error - lam * (site.macs - o.macs))
        picks.append(best if best.error - lam * (site.macs - best.macs) < 0 else None)
    return picks


def _saved(per_site: list, picks: list) -> int:
    return sum(site.macs - opt.macs for (site, _), opt in zip(per_site, picks) if opt is not None)


def _site(view: GraphView, node: Node, shapes: dict) -> _Site | str:
    in_shape = shapes.get(node.inputs[0]) if node.inputs else None
    if not in_shape or any(not isinstance(d, int) for d in in_shape):
        return "input shape unknown"
    weight = view.param(node.name, "weight").astype(np.float64)
    bias = view.param(node.name, "bias").astype(np.float64) if "bias" in node.params else None
    if node.kind is OpKind.CONV:
        if node.attrs.get("groups", 1) != 1:
            return f"grouped conv (groups={node.attrs['groups']}): not factorized"
        if node.attrs.get("pads") is None:
            return "pads depend on the input size (auto_pad / 'same'): not factorized"
        if weight.ndim != 4:
            return f"{weight.ndim - 2}-D conv: only 2-D convs are factorized"
    site = _Site(node, weight, bias, tuple(in_shape), 0)
    return _Site(node, weight, bias, tuple(in_shape),
                 chain_macs((_original_layer(site),), site.in_shape))


def _original_layer(site: _Site) -> Layer:
    node = site.node
    if node.kind is OpKind.LINEAR:
        return Layer(OpKind.LINEAR, site.weight, site.bias)
    return Layer(OpKind.CONV, site.weight, site.bias, 1, *conv_geometry(node))


def _split_hw(node: Node):
    """(vertical, horizontal) strides/pads/dilations for a Kx1 then 1xK pair."""
    (sh, sw), (ph0, pw0, ph1, pw1), (dh, dw) = conv_geometry(node)
    return ((sh, 1), (ph0, 0, ph1, 0), (dh, 1)), ((1, sw), (0, pw0, 0, pw1), (1, dw))


def _pointwise_chain(site: _Site, first, second, bias) -> tuple:
    if site.node.kind is OpKind.LINEAR:
        return Layer(OpKind.LINEAR, first), Layer(OpKind.LINEAR, second, bias)
    strides, pads, dilations = conv_geometry(site.node)
    return (Layer(OpKind.CONV, first[:, :, None, None], None, 1, strides, pads, dilations),
            Layer(OpKind.CONV, second[:, :, None, None], bias))


def _spatial_chain(site: _Site, vertical, horizontal, bias) -> tuple:
    v, h = _split_hw(site.node)
    return Layer(OpKind.CONV, vertical, None, 1, *v), Layer(OpKind.CONV, horizontal, bias, 1, *h)


def _tucker_chain(site: _Site, first, core, last, bias) -> tuple:
    return (Layer(OpKind.CONV, first[:, :, None, None]),
            Layer(OpKind.CONV, core, None, 1, *conv_geometry(site.node)),
            Layer(OpKind.CONV, last[:, :, None, None], bias))


def _cp_chain(site: _Site, a, b, c, d, bias) -> tuple:
    r = a.shape[1]
    v, h = _split_hw(site.node)
    return (Layer(OpKind.CONV, b.T[:, :, None, None]),
            Layer(OpKind.CONV, c.T[:, None, :, None], None, r, *v),
            Layer(OpKind.CONV, d.T[:, None, None, :], None, r, *h),
            Layer(OpKind.CONV, a[:, :, None, None], bias))
