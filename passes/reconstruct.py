"""reconstruct: refit compressed layers to what the original model computed, on calibration data.

Algorithm (He et al. 2017 "Channel pruning for accelerating very deep networks", ThiNet 2017,
AIMET's channel-pruning reconstruction): for every CONV / LINEAR layer of the compressed graph
whose output is a value of the reference model (the model before the pipeline's first lossy
pass, kept by the pass manager: graphslim/provenance.py, which also maps a pruned layer's
channels back to the reference's), refit its weight and bias by ridge regression towards the
current weights so that, on the inputs the *compressed* model now feeds it, its output matches
the reference's output at that point (passes/reconstruct_math.py has the formula). Layers are
refit in rounds from the inputs to the outputs: a round holds the layers whose inputs depend
only on layers already refit, and each round's inputs are captured from a scratch copy with the
earlier rounds applied, so a layer corrects the error that reaches it instead of adding to it.
Only Gram matrices are accumulated (streaming over the data, a sample of `rows` patches or
tokens per sample and layer); grouped and depthwise convs are solved per group.

Works after prune-channels (a layer with pruned inputs is refit to its original output, its
pruned outputs to the kept channels of it), factorize (the last layer of a chain writes the
factorized layer's output and is refit), conv-group / conv-separable likewise, and before qdq.

Left as they are, each with its reason: layers whose output has no matching reference value
(the inner layers of a factorized chain), shared weights, convs with unresolved padding or
non-zero padding modes, refits that do not lower the error on held-out calibration samples
(one in five), and layers that already match (nothing was compressed upstream: a pipeline
that changes nothing reconstructs to the same weights). Needs real calibration data; on
synthetic inputs the report says so.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np

from graphslim import data as data_mod
from graphslim.analyses.activations import data_or_synthetic
from graphslim.edits import SetParam
from graphslim.ir import GraphView, Node, OpKind, conv_geometry
from graphslim.pass_manager import Pass, Plan, register_pass
from graphslim.passes import reconstruct_math as rm
from graphslim.provenance import Provenance

log = logging.getLogger(__name__)

#: below this relative error at its output a layer already matches the reference
_MATCHES = 1e-6


@dataclass
class _Site:
    node: Node
    target: str          # the reference value it is fitted to
    bias: bool           # a bias is fitted (CONV always; LINEAR where it has one)
    w0: np.ndarray       # (g, F, O/g) current weights
    groups: int
    channels: np.ndarray  # the reference channel of each output channel
    shape: tuple          # the weight's canonical shape and dtype, for writing it back
    dtype: np.dtype
    fit: rm.Normal | None = None
    held: rm.Normal | None = None
    problem: str = ""


@register_pass
@dataclass(frozen=True)
class Reconstruct(Pass):
    name = "reconstruct"
    lossless = False
    needs_data = True
    needs_reference = True
    summary = "refit compressed layers to the original's outputs on calibration data"

    rows: int = 256
    min_gain: float = 0.01
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, not {self.rows}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min-gain must be in [0, 1), not {self.min_gain}")

    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        prov = analyses.provenance or Provenance(analyses.model.copy())
        sites = self._sites(view, prov, plan)
        if not sites:
            plan.notes.append("nothing to reconstruct")
            return plan
        source, synthetic = data_or_synthetic(analyses, "reconstruction")
        if synthetic:
            plan.notes.append("reconstructed on SYNTHETIC inputs: the layers are fitted to "
                              "noise, not to the user's data (give calibration data)")
        scratch = analyses.trial_model([])
        feeds = _feeds(source, analyses.model.input_specs(), (scratch, prov.reference),
                       sites[0].node.inputs[0])
        rng = np.random.default_rng(self.seed)
        rounds = _rounds(view, sites)
        for layer_round in rounds:
            edits = self._refit_round(layer_round, scratch, prov.reference, feeds, rng, plan)
            scratch.apply(edits)
            plan.edits.extend(edits)
        plan.stats["rounds"] = len(rounds)
        plan.stats["samples"] = sum(_batch_size(f) for f in feeds)
        return plan

    def _sites(self, view: GraphView, prov: Provenance, plan: Plan) -> list[_Site]:
        ref_view = prov.reference.view()
        known = set(ref_view.inputs) | {v for n in ref_view.nodes() for v in n.outputs}
        sites = []
        for node in view.nodes():
            if node.kind not in (OpKind.CONV, OpKind.LINEAR) or not node.inputs:
                continue
            if any(fnmatch.fnmatchcase(node.name, pat) for pat in self.exclude):
                plan.skip(node.name, "excluded")
                continue
            target = prov.reference_value(node.output)
            problem = _problem(view, node) or (
                None if target in known else
                f"its output '{node.output}' has no matching value in the original model")
            if problem:
                plan.skip(node.name, problem)
                continue
            sites.append(_site(view, node, target, prov))
        return sites

    def _refit_round(self, layer_round: list[_Site], scratch, reference, feeds: list[dict],
                     rng, plan: Plan) -> list:
        inputs = sorted({s.node.inputs[0] for s in layer_round})
        targets = sorted({s.target for s in layer_round})
        for s in layer_round:
            out = s.w0.shape[2]
            s.fit = rm.Normal(s.groups, s.w0.shape[1], out)
            s.held = rm.Normal(s.groups, s.w0.shape[1], out)
        for i, feed in enumerate(feeds):
            xs = scratch.capture(feed, inputs, optimized=True)
            ys = reference.capture(feed, targets, optimized=True)
            held = i % 5 == 4 or (len(feeds) < 5 and i == len(feeds) - 1 and i > 0)
            for s in layer_round:
                if s.problem:
                    continue
                x, y = _rows(s, xs[s.node.inputs[0]], ys[s.target], self.rows, rng)
                if x is not None:
                    (s.held if held else s.fit).add(x, y)
        edits = []
        for s in layer_round:
            edits.extend(self._solve(s, plan))
        return edits

    def _solve(self, s: _Site, plan: Plan) -> list:
        name = s.node.name
        if s.problem:
            plan.skip(name, s.problem)
            return []
        s.fit.flush()
        s.held.flush()
        if s.fit.rows == 0 or s.held.rows == 0:
            plan.skip(name, "no calibration rows reached it (needs 2 or more samples)")
            return []
        base = np.sqrt(max(s.held.error(s.w0), 0) / max(s.held.energy(), 1e-30))
        if base < _MATCHES:
            plan.skip(name, f"already matches the original (relative error {base:.2g})")
            return []
        refit = rm.choose_refit(s.fit, s.held, s.w0, self.min_gain)
        plan.details.append({"node": name, "before": refit.before, "after": refit.after,
                             "lambda": refit.lam, "rows": s.fit.rows + s.held.rows})
        if refit.weights is None:
            plan.skip(name, refit.reason)
            return []
        plan.stats["refit"] += 1
        return _param_edits(s, refit.weights)


def _problem(view: GraphView, node: Node) -> str | None:
    users = view.param_users(node.name, "weight")
    if len(users) > 1:
        return f"weight shared with {', '.join(u for u in users if u != node.name)}"
    if node.kind is OpKind.CONV:
        a = node.attrs
        if a.get("pads") is None:
            return "padding depends on the input size (auto_pad): not resolved"
        if a.get("padding_mode", "zeros") != "zeros":
            return f"padding mode '{a['padding_mode']}' (only zero padding is modelled)"
    return None


def _site(view: GraphView, node: Node, target: str, prov: Provenance) -> _Site:
    weight = view.param(node.name, "weight")
    has_bias = view.has_param(node.name, "bias")
    bias = view.param(node.name, "bias") if has_bias else None
    channels = prov.channels(node.output, weight.shape[0])
    if node.kind is OpKind.CONV:
        groups = int(node.attrs.get("groups", 1))
        if bias is None:
            bias = np.zeros(weight.shape[0], weight.dtype)
        return _Site(node, target, True, rm.conv_weights(weight, bias, groups), groups,
                     channels, weight.shape, weight.dtype)
    w = weight.T[None].astype(np.float64)
    if has_bias:
        w = np.concatenate([w, bias.reshape(1, 1, -1)], axis=1)
    return _Site(node, target, has_bias, w, 1, channels, weight.shape, weight.dtype)


def _rows(s: _Site, x: np.ndarray, y: np.ndarray, count: int, rng
          ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Sampled input rows (R, g, F) and the reference's output rows (R, g, O/g) of one batch;
    (None, None) with `s.problem` set where the shapes do not line up."""
    out_axis = 1 if s.node.kind is OpKind.CONV else y.ndim - 1
    if y.shape[out_axis] <= int(s.channels.max(initial=-1)):
        s.problem = (f"the original's '{s.target}' has {y.shape[out_axis]} channels; the "
                     f"layer maps to channel {int(s.channels.max())}")
        return None, None
    y = np.take(y, s.channels, axis=out_axis)
    if s.node.kind is OpKind.CONV:
        strides, pads, dilations = conv_geometry(s.node)
        kernel = tuple(s.node.attrs["kernel_shape"])
        out = rm.conv_output_size(x.shape[2:], kernel, strides, pads, dilations)
        if tuple(y.shape[2:]) != out:
            s.problem = (f"the original's '{s.target}' has spatial size {list(y.shape[2:])}, "
                         f"the layer's output {list(out)}")
            return None, None
        rows, where = rm.patch_rows(x, kernel, strides, pads, dilations, s.groups, count, rng)
        target = rm.output_rows(y, where, s.groups)
    else:
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.reshape(-1, y.shape[-1])
        if len(flat_x) != len(flat_y):
            s.problem = (f"the original's '{s.target}' has {len(flat_y)} rows, the layer's "
                         f"input {len(flat_x)}")
            return None, None
        samples = x.shape[0] if x.ndim > 1 else 1
        pick = rng.choice(len(flat_x), min(len(flat_x), count * samples), replace=False)
        rows, target = flat_x[pick][:, None, :], flat_y[pick][:, None, :]
    if s.bias:
        rows = rm.with_ones(rows)
    if rows.shape[2] != s.w0.shape[1]:
        s.problem = f"its input rows have {rows.shape[2]} features, its weight {s.w0.shape[1]}"
        return None, None
    return rows, target


def _param_edits(s: _Site, w: np.ndarray) -> list:
    """SetParam edits writing refit weights (g, F, O/g) back in canonical layout."""
    node = s.node.name
    dtype = s.dtype
    if s.node.kind is OpKind.CONV:
        weight, bias = rm.split_conv_weights(w, s.shape, s.bias)
    else:
        core = w[0, :-1] if s.bias else w[0]
        weight, bias = core.T, (w[0, -1] if s.bias else None)
    edits = [SetParam(node, "weight", np.ascontiguousarray(weight, dtype))]
    if bias is not None:
        edits.append(SetParam(node, "bias", np.ascontiguousarray(bias, dtype)))
    return edits


#: samples per capture run where the model takes any batch size (ORT and torch run a batch of
#: 16 several times faster than 16 runs of one)
_CAPTURE_BATCH = 16


def _feeds(source, specs, models, probe: str) -> list[dict]:
    """The data in batches of _CAPTURE_BATCH where every model runs them, else in the batch
    size of the model's inputs (an export with a fixed batch of 1)."""
    big = list(data_mod.batches(source, specs, size=_CAPTURE_BATCH, keep_last=True))
    if _batch_size(big[0]) > _batch_size(next(data_mod.batches(source, specs))):
        try:
            for m in models:
                m.capture(big[0], [probe], optimized=True)
            return big
        except Exception as exc:  # a fixed batch dimension: ORT's or torch's own error
            log.info("reconstruct: batches of %d do not run (%s); one batch per run",
                     _CAPTURE_BATCH, str(exc).splitlines()[0][:120])
    return list(data_mod.batches(source, specs))


def _batch_size(feed: dict) -> int:
    sizes = [v.shape[0] for v in feed.values() if getattr(v, "ndim", 0) > 0]
    return sizes[0] if sizes else 1


def _rounds(view: GraphView, sites: list[_Site]) -> list[list[_Site]]:
    """Layers by depth: a layer's round is one more than the deepest refit layer it reads."""
    by_name = {s.node.name: s for s in sites}
    depth: dict[str, int] = {}
    rounds: dict[int, list[_Site]] = {}
    for node in view.nodes():
        d = max((depth.get(v, 0) for v in node.inputs), default=0)
        if node.name in by_name:
            d += 1
            rounds.setdefault(d, []).append(by_name[node.name])
        for v in node.outputs:
            depth[v] = d
    return [rounds[k] for k in sorted(rounds)]
