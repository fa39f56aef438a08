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
from dataclasses import dataclass, field

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
    ref_value: str       # the reference model's value it is fitted to
    bias: bool           # a bias is fitted (CONV always; LINEAR where it has one)
    w0: np.ndarray       # (g, F, O/g) current weights
    groups: int
    channels: np.ndarray  # the reference channel of each output channel
    shape: tuple          # the weight's canonical shape and dtype, for writing it back
    dtype: np.dtype
    fit: rm.Normal | None = None
    held: rm.Normal | None = None
    problem: str = ""
    #: per calibration batch: where the rows were sampled (conv: output positions; linear:
    #: row indices) and the reference's output there for the layer's channels (float32)
    samples: list = field(default_factory=list)
    out_shape: tuple = ()  # the reference output's spatial size (conv)


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
        last = sites[-1]  # the deepest layer: its inputs need (almost) every node to run
        feeds = _feeds(source, analyses.model.input_specs(),
                       ((scratch, last.node.inputs[0]), (prov.reference, last.ref_value)))
        _sample_targets(sites, prov.reference, feeds, self.rows,
                         np.random.default_rng(self.seed))
        rounds = _rounds(view, sites)
        carried = [dict(f) for f in feeds]  # per batch: the values the next round starts from
        for layer_round, frontier in zip(rounds, _frontiers(view, rounds)):
            edits = self._refit_round(layer_round, scratch, carried, frontier, plan)
            scratch.apply(edits)
            plan.edits.extend(edits)
        plan.stats["rounds"] = len(rounds)
        plan.stats["samples"] = sum(data_mod.feed_size(f) for f in feeds)
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
            ref_value = prov.reference_value(node.output)
            problem = _problem(view, node) or (
                None if ref_value in known else
                f"its output '{node.output}' has no matching value in the original model")
            if problem:
                plan.skip(node.name, problem)
                continue
            sites.append(_site(view, node, ref_value, prov))
        return sites

    def _refit_round(self, layer_round: list[_Site], scratch, carried: list[dict],
                     frontier: list[str], plan: Plan) -> list:
        """Accumulate each layer's normal equations on the inputs the compressed model (with
        the earlier rounds refit) now gives it, against the reference rows sampled before.
        Each batch runs from the values `carried` from the round before (not from the model's
        inputs) and leaves the next round's: `frontier`."""
        live = [s for s in layer_round if not s.problem]
        inputs = sorted({s.node.inputs[0] for s in live})
        for s in live:
            out = s.w0.shape[2]
            s.fit = rm.Normal(s.groups, s.w0.shape[1], out)
            s.held = rm.Normal(s.groups, s.w0.shape[1], out)
        for i, start in enumerate(carried):
            xs = scratch.capture(start, sorted(set(inputs) | set(frontier)), optimized=True)
            carried[i] = {v: xs[v] for v in frontier}
            held = i % 5 == 4 or (len(carried) < 5 and i == len(carried) - 1 and i > 0)
            for s in live:
                if s.problem:
                    continue
                x = _input_rows(s, xs[s.node.inputs[0]], s.samples[i][0])
                if x is not None:
                    (s.held if held else s.fit).add(x, s.samples[i][1])
        edits = []
        for s in layer_round:
            edits.extend(self._solve(s, plan))
            s.samples, s.fit, s.held = [], None, None  # memory: ~F^2 per layer
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


def _site(view: GraphView, node: Node, ref_value: str, prov: Provenance) -> _Site:
    weight = view.param(node.name, "weight")
    has_bias = view.has_param(node.name, "bias")
    bias = view.param(node.name, "bias") if has_bias else None
    channels = prov.channels(node.output, weight.shape[0])
    if node.kind is OpKind.CONV:
        groups = int(node.attrs.get("groups", 1))
        if bias is None:
            bias = np.zeros(weight.shape[0], weight.dtype)
        return _Site(node, ref_value, True, rm.conv_weights(weight, bias, groups), groups,
                     channels, weight.shape, weight.dtype)
    w = weight.T[None].astype(np.float64)
    if has_bias:
        w = np.concatenate([w, bias.reshape(1, 1, -1)], axis=1)
    return _Site(node, ref_value, has_bias, w, 1, channels, weight.shape, weight.dtype)


#: bytes of reference outputs one capture run may return: all targets are fetched at once,
#: and ORT allocates every fetched value apart (resnet50's conv outputs: 44 MB per sample).
#: Slicing only the reference's runs keeps the compressed model's at _CAPTURE_BATCH (batches
#: of 5 for both: resnet50's reconstruct 57 -> 64 s)
_TARGET_BYTES = 256 << 20


def _sample_targets(sites: list[_Site], reference, feeds: list[dict], count: int, rng
                    ) -> None:
    """One run of the reference model per calibration batch, all targets at once: for every
    layer, `count` rows per sample at random positions (the same positions its inputs are
    sampled at later) and the reference's output there. Only these rows are kept, so the
    reference runs once, not once per round (it is the unpruned, most expensive model). A
    batch whose targets would exceed _TARGET_BYTES is run in slices of it."""
    targets = sorted({s.ref_value for s in sites})
    shapes = reference.infer_shapes()
    per_sample = sum(4 * int(np.prod(shapes[t][1:])) for t in targets
                     if shapes.get(t) and all(isinstance(d, int) for d in shapes[t]))
    step = max(1, _TARGET_BYTES // max(per_sample, 1))
    for feed in feeds:
        n = data_mod.feed_size(feed)
        sizes = {v.shape[0] for v in feed.values() if getattr(v, "ndim", 0) > 0}
        bounds = range(0, n, step) if sizes == {n} else range(0, 1)
        parts: dict[int, list] = {id(s): [] for s in sites}
        for start in bounds:
            part = feed if len(bounds) == 1 else {k: v[start:start + step]
                                                   for k, v in feed.items()}
            ys = reference.capture(part, targets, optimized=True)
            for s in sites:
                if not s.problem:
                    parts[id(s)].append((start, _target_rows(s, ys[s.ref_value], count, rng)))
            del ys
        for s in sites:
            if not s.problem:  # (a slice may have found one)
                s.samples.append(_joined(s, parts[id(s)]))


def _joined(s: _Site, parts: list) -> tuple:
    """The rows sampled from slices of one batch, as if sampled from the batch: positions
    shifted by each slice's first sample."""
    if len(parts) == 1:
        return parts[0][1]
    rows = np.concatenate([p[1][1] for p in parts])
    if s.node.kind is OpKind.CONV:
        where = tuple(np.concatenate([w[k] + (start if k == 0 else 0)
                                      for start, (w, _) in parts])
                      for k in range(len(parts[0][1][0])))
        return where, rows
    # linear: flat row indices; each slice holds (its samples x rows per sample) rows
    picks, total = [], 0
    for _, ((pick, count), _) in parts:
        picks.append(pick + total)
        total += count
    return (np.concatenate(picks), total), rows


def _target_rows(s: _Site, y: np.ndarray, count: int, rng) -> tuple:
    """(where, rows (R, g, O/g)) of the reference output y for site s; ((), None) with
    `s.problem` set where its channels do not line up."""
    out_axis = 1 if s.node.kind is OpKind.CONV else y.ndim - 1
    if y.ndim < 2 or y.shape[out_axis] <= int(s.channels.max(initial=-1)):
        s.problem = (f"the original's '{s.ref_value}' has shape {list(y.shape)}; the layer maps "
                     f"to its channel {int(s.channels.max())}")
        return (), None
    y = np.take(y, s.channels, axis=out_axis)
    if s.node.kind is OpKind.CONV:
        s.out_shape = tuple(y.shape[2:])
        where = rm.sample_positions(y.shape[0], s.out_shape, count, rng)
        return where, np.asarray(rm.output_rows(y, where, s.groups), np.float32)
    flat = y.reshape(-1, y.shape[-1])
    samples = y.shape[0] if y.ndim > 2 else 1
    pick = rng.choice(len(flat), min(len(flat), count * samples), replace=False)
    return (pick, len(flat)), np.asarray(flat[pick][:, None, :], np.float32)


def _input_rows(s: _Site, x: np.ndarray, where: tuple) -> np.ndarray | None:
    """The rows (R, g, F) the compressed model feeds site s at the sampled positions; None
    with `s.problem` set where the shapes do not line up with the reference's."""
    if s.node.kind is OpKind.CONV:
        strides, pads, dilations = conv_geometry(s.node)
        kernel = tuple(s.node.attrs["kernel_shape"])
        out = rm.conv_output_size(x.shape[2:], kernel, strides, pads, dilations)
        if s.out_shape != out:
            s.problem = (f"the original's '{s.ref_value}' has spatial size {list(s.out_shape)}, "
                         f"the layer's output {list(out)}")
            return None
        rows = rm.patch_rows(x, kernel, strides, pads, dilations, s.groups, where)
    else:
        pick, total = where
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) != total:
            s.problem = (f"the original's '{s.ref_value}' has {total} rows, the layer's input "
                         f"{len(flat)}")
            return None
        rows = flat[pick][:, None, :]
    if s.bias:
        rows = rm.with_ones(rows)
    if rows.shape[2] != s.w0.shape[1]:
        s.problem = f"its input rows have {rows.shape[2]} features, its weight {s.w0.shape[1]}"
        return None
    return rows


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


def _feeds(source, specs, probes) -> list[dict]:
    """The data in batches of _CAPTURE_BATCH where every (model, value) of `probes` computes
    on them, else in the batch size of the model's inputs (a Reshape to a fixed batch)."""
    big = list(data_mod.batches(source, specs, size=_CAPTURE_BATCH, keep_last=True))
    if data_mod.feed_size(big[0]) > data_mod.feed_size(next(data_mod.batches(source, specs))):
        try:
            for m, value in probes:
                m.capture(big[0], [value], optimized=True)
            return big
        except Exception as exc:  # a fixed batch dimension: ORT's or torch's own error
            log.info("reconstruct: batches of %d do not run (%s); one batch per run",
                     _CAPTURE_BATCH, str(exc).splitlines()[0][:120])
    return list(data_mod.batches(source, specs))


def _frontiers(view: GraphView, rounds: list[list[_Site]]) -> list[list[str]]:
    """For each round, the values its batch run must leave for the rounds after it: the nodes
    its layers' inputs depend on (and those of the rounds before) form a part of the graph no
    later refit changes (a layer's inputs never depend on a layer of its own round or a later
    one); the values that part (or the model's inputs) gives to a node outside it. Carrying
    them, each round runs only the nodes between two rounds instead of the whole prefix
    again (resnet50: 50 rounds; the prefix runs were half of the pass's time)."""
    nodes = list(view.nodes())
    by_name = {n.name: n for n in nodes}
    producer = {v: n.name for n in nodes for v in n.outputs}
    graph_inputs = set(view.inputs)
    done: set[str] = set()
    out = []
    for layer_round in rounds:
        stack = [s.node.inputs[0] for s in layer_round]
        while stack:
            p = producer.get(stack.pop())
            if p is not None and p not in done:
                done.add(p)
                stack.extend(by_name[p].inputs)
        out.append(sorted({v for n in nodes if n.name not in done for v in n.inputs
                           if v in graph_inputs or producer.get(v) in done}))
    return out


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
