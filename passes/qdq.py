"""qdq: calibrated int8 quantize / dequantize insertion (weight math in passes/qdq_math.py,
ranges from graphslim/analyses/calibration.py).

Placement (what keeps ONNX Runtime's kernels integer; FIELD-NOTES: on x86 only uint8
activations with int8 weights fuse):
- Every node of the selected `ops` (conv, linear, matmul, add, mul, avgpool, concat, sigmoid,
  leakyrelu, silu: the ops with an integer kernel in ORT) gets its float activation inputs and
  its output quantized; conv / linear weights become int8 per output channel (symmetric), biases
  int32 at scale s_x * s_w.
- A ReLU / Clip that is the only reader of such an output is absorbed: the grid goes on the
  activation's output (lower bound 0, so zero point 0) and ORT drops the activation.
- Data-movement ops (max pool, reshape, flatten, transpose, slice, identity) whose input is
  quantized get their output quantized on the *same* grid, so ORT runs them on uint8.
- SiLU written as Sigmoid + Mul (how exporters write nn.SiLU) stays float unless `silu` is in
  `ops`: the pair becomes one fused op (FuseActivation) between a dequantize and a quantize,
  faster on ORT CPU than its int8 Sigmoid and Mul kernels (measured, see DEFAULT_OPS).
- A quantized op whose output is a graph output keeps a float output (ORT's QGemm /
  MatMulIntegerToFloat produce float; other ops then stay float with int8 weights).

Ranges: per activation, from the calibration histograms with `method` (minmax, percentile,
entropy, mse). `max-error` > 0 turns on the sensitivity mode: layers are ranked by the output
error each causes when quantized alone (on calibration data), and the worst are kept float,
most sensitive first, until the whole model's relative L2 error on that data is within budget.

`bias-correct` (empirical bias correction, Nagel et al. 2019): each quantized conv / linear with
a bias gets E[(W~ - W) x] subtracted from it, E[x] its input's per-channel mean on the
calibration data (passes/qdq_math.bias_shift), so weight rounding leaves no mean output shift.

Lossy: the pass manager reports the error against the float graph. Preserves nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass

import numpy as np

from graphslim.analyses.activations import LayerInputStats
from graphslim.analyses.calibration import METHODS, calibrate_range, calibration_of, grid
from graphslim.edits import FuseActivation, QuantizeParam, QuantizeValue, SetParam
from graphslim.ir import GraphView, Node, OpKind
from graphslim.pass_manager import Pass, Plan, register_pass
from graphslim.passes import qdq_math as qm

log = logging.getLogger(__name__)

OPS = ("conv", "linear", "matmul", "add", "mul", "avgpool", "concat", "sigmoid", "leakyrelu",
       "silu")
#: by default SiLU (x * sigmoid(x)) stays float between grids, fused into one op where the
#: frontend can: on this CPU ORT's int8 Sigmoid + Mul pair cost 57 us per efficientnet_b0 SiLU
#: against 38 us for dequantize + fused float SiLU + quantize (whole model 1.15x faster)
DEFAULT_OPS = tuple(o for o in OPS if o != "silu")
_PASS_THROUGH = frozenset({OpKind.POOL_MAX, OpKind.RESHAPE, OpKind.FLATTEN, OpKind.TRANSPOSE,
                           OpKind.SLICE, OpKind.IDENTITY})
_ABSORBED = frozenset({"relu", "relu6", "clip"})
ACTIVATION_TYPES = ("uint8", "int8")


def op_class(node: Node) -> str | None:
    """The `ops` name of a node that has an integer kernel, else None."""
    k = node.kind
    if k is OpKind.CONV and "weight" in node.params and len(node.attrs.get("kernel_shape",
                                                                             ())) in (1, 2):
        return "conv"
    if k is OpKind.LINEAR and "weight" in node.params:
        return "linear"
    simple = {OpKind.MATMUL: "matmul", OpKind.ADD: "add", OpKind.MUL: "mul",
              OpKind.POOL_GLOBAL_AVG: "avgpool", OpKind.POOL_AVG: "avgpool",
              OpKind.CONCAT: "concat"}
    if k in simple:
        return simple[k]
    fn = node.attrs.get("fn")  # the IR's activation vocabulary (both frontends spell it so)
    return fn if k is OpKind.ACTIVATION and fn in ("sigmoid", "leakyrelu") else None


def _silu_pairs(view: GraphView) -> dict[str, str]:
    """Mul name -> Sigmoid name for each x * sigmoid(x) whose sigmoid feeds only that Mul."""
    pairs = {}
    for s in view.nodes():
        if s.kind is not OpKind.ACTIVATION or s.attrs.get("fn") != "sigmoid" \
                or view.is_graph_output(s.output) or not s.inputs:
            continue
        users = view.users(s.output)
        if len(users) == 1 and users[0].kind is OpKind.MUL and \
                sorted(users[0].inputs) == sorted((s.inputs[0], s.output)):
            pairs[users[0].name] = s.name
    return pairs


def _absorbable(node: Node) -> bool:
    return node.kind is OpKind.ACTIVATION and node.attrs.get("fn") in _ABSORBED


@register_pass
@dataclass(frozen=True)
class InsertQDQ(Pass):
    name = "qdq"
    lossless = False
    min_opset = 13  # per-channel DequantizeLinear (`axis`) came in opset 13
    final = True  # its grids are calibrated for the graph it saw
    needs_data = True  # calibration on random inputs gives ranges real data does not have
    summary = "calibrated int8 quantize/dequantize insertion (ORT integer kernels)"
    method: str = "percentile"
    percentile: float = 0.9999
    samples: int = 0
    #: 0: decided for this CPU (7 where ORT's u8 x s8 kernel saturates, x86 without VNNI; else
    #: 8), written into the decided pipeline text
    weight_bits: int = 0
    per_channel: bool = True
    activations: str = "uint8"
    ops: tuple[str, ...] = DEFAULT_OPS
    exclude: tuple[str, ...] = ()
    max_error: float = 0.0
    #: cost: int8 wherever `ops` asks; latency: int8 only where it measures faster on this
    #: machine (passes/qdq_latency.py), the decision written back into the pipeline text
    choose: str = "cost"
    min_gain: float = 0.03
    threads: int = 1  # ORT intra-op threads the latency choice is measured at (0: all cores)
    #: subtract each conv / linear's expected output shift from weight rounding (its input's
    #: per-channel mean on the calibration data; qdq_math.bias_shift) from its bias
    bias_correct: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method '{self.method}' "
                             f"(known: {', '.join(METHODS)})")
        if self.weight_bits and not 2 <= self.weight_bits <= 8:
            raise ValueError(f"weight-bits must be 0 (this CPU's) or in 2..8, not "
                             f"{self.weight_bits}")
        if self.activations not in ACTIVATION_TYPES:
            raise ValueError(f"activations must be one of {ACTIVATION_TYPES}, "
                             f"not '{self.activations}'")
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(f"ops must be a ';'-list of {', '.join(OPS)}, not "
                             f"{';'.join(self.ops) or 'nothing'}")
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0.5, 1], not {self.percentile}")
        if self.samples < 0 or self.max_error < 0:
            raise ValueError("samples and max-error must be >= 0")
        if self.choose not in ("cost", "latency"):
            raise ValueError(f"choose must be cost or latency, not '{self.choose}'")
        if not 0 <= self.min_gain < 1 or self.threads < 0:
            raise ValueError("min-gain must be in [0, 1) and threads >= 0")

    def plan(self, view: GraphView, analyses) -> Plan:
        if not self.weight_bits:
            return self._plan_weight_bits(view, analyses)
        if self.choose == "latency":
            from graphslim.passes.qdq_latency import choose_by_latency

            return choose_by_latency(self, view, analyses, op_class)
        return self._plan(view, analyses)

    def _plan_weight_bits(self, view: GraphView, analyses) -> Plan:
        """weight-bits=0: 8 where ORT's integer kernel is exact (VNNI, non-x86); on x86 without
        VNNI, where u8 x s8 pair sums saturate in int16 (vpmaddubsw), 8 and 7 bits (ORT's
        reduce_range) are both tried and the one whose deployed model is closer to the float
        one on calibration samples is kept (the demo CNN: 6.4 vs 27.0 dB, so 7; random-weight
        resnet18: 8). The choice goes into the decided pipeline. On fx the trial runs the
        fake-quantized module in torch, which does not saturate, so 8 usually wins there."""
        from graphslim.passes.qdq_sensitivity import weight_bits_by_error
        from graphslim.runtime import int8_weights_saturate

        if not int8_weights_saturate():
            plan = dataclasses.replace(self, weight_bits=8).plan(view, analyses)
            plan.decided["weight_bits"] = 8
            return plan
        probe = {b: dataclasses.replace(self, weight_bits=b, choose="cost", max_error=0.0)
                 ._plan(view, analyses) for b in (8, 7)}
        if not probe[8].edits:  # nothing to quantize: no weights to size
            bits, sqnr = 8, {}
        else:
            bits, sqnr = weight_bits_by_error(probe, analyses)
        chosen = dataclasses.replace(self, weight_bits=bits)
        plan = probe[bits] if (self.choose, self.max_error) == ("cost", 0.0) else \
            chosen.plan(view, analyses)
        plan.decided["weight_bits"] = bits
        if sqnr:
            plan.notes.append(f"weight-bits {bits}: no VNNI on this CPU (u8 x s8 sums saturate "
                              f"in int16); deployed SQNR on calibration samples: 8 bits "
                              f"{sqnr[8]:.1f} dB, 7 bits {sqnr[7]:.1f} dB")
        return plan

    def _plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        float_silu = "silu" not in self.ops and "silu" in view.fused_activations
        silus = _silu_pairs(view) if float_silu else {}
        chosen = self._select(view, plan, set(silus) | set(silus.values()))
        if not chosen:
            return plan
        calib = analyses.get(calibration_of(self.samples))
        means = analyses.get(LayerInputStats).means if self.bias_correct else {}
        if calib.synthetic:
            plan.notes.append("calibrated on synthetic inputs (no data given): ranges are not "
                              "those of real data")
        if self.max_error:
            from graphslim.passes.qdq_sensitivity import keep_float

            def edits_for(subset) -> list:  # the plan quantizing only `subset`, for a trial
                trial = Plan()
                self._emit(view, subset, self._grids(view, subset, calib, trial), trial, means)
                return trial.edits

            kept = keep_float(edits_for, analyses, chosen, self.max_error, plan)
            chosen = [n for n in chosen if n.name not in kept]
        grids = self._grids(view, chosen, calib, plan)
        for mul, sig in silus.items():
            plan.edits.append(FuseActivation(mul, "silu", (sig, mul)))
        plan.stats["float_silu"] = len(silus)
        self._emit(view, chosen, grids, plan, means)
        plan.notes.append(f"calibration: {self.method} on {calib.samples} samples")
        return plan

    # --- placement ---------------------------------------------------------------------------
    def _select(self, view: GraphView, plan: Plan, floats: set[str]) -> list[Node]:
        chosen = []
        for n in view.nodes():
            cls = op_class(n)
            if cls is None or n.name in floats:
                continue
            if cls not in self.ops:
                continue
            if any(fnmatch.fnmatch(n.name, p) for p in self.exclude):
                plan.skip(n.name, "excluded by name")
                continue
            if not n.inputs:
                plan.skip(n.name, "no activation input")
                continue
            chosen.append(n)
        return chosen

    def output_value(self, view: GraphView, n: Node) -> str | None:
        """The value whose grid ends `n`'s integer kernel (a lone ReLU / Clip reader absorbed),
        or None when it is a graph output (kept float)."""
        v = n.output
        users = view.users(v)
        if len(users) == 1 and _absorbable(users[0]) and not view.is_graph_output(v) and \
                not any(fnmatch.fnmatch(users[0].name, p) for p in self.exclude):
            v = users[0].output
        return None if view.is_graph_output(v) else v

    def _values(self, view: GraphView, chosen: list[Node]) -> tuple[list[str], dict[str, str]]:
        """Values to quantize, in topological order, and pass-through ties (output -> input)."""
        wanted: dict[str, None] = {}
        names = {n.name for n in chosen}
        for n in chosen:
            for v in n.inputs:
                wanted[v] = None
            out = self.output_value(view, n)
            if out is not None and not _float_output(view, n, out, names):
                wanted[out] = None
        ties: dict[str, str] = {}
        for n in view.nodes():  # topological: a tie sees its input's final state
            if n.kind in _PASS_THROUGH and n.inputs and n.inputs[0] in wanted and \
                    len(n.outputs) == 1 and not view.is_graph_output(n.output):
                wanted[n.output] = None
                ties[n.output] = ties.get(n.inputs[0], n.inputs[0])
        return list(wanted), ties

    def _grids(self, view, chosen, calib, plan) -> dict[str, tuple[float, int]]:
        values, ties = self._values(view, chosen)
        qmin, qmax = qm.INT_RANGES[self.activations]
        grids = {}
        for v in values:
            src = ties.get(v, v)
            h = calib.histograms.get(src)
            if h is None or h.nonfinite or h.lo > h.hi:
                why = "not a float activation" if h is None else "holds inf / NaN (a mask?)"
                plan.skip(view.producer(v).name if view.producer(v) else v,
                          f"'{v}' left float: {why}")
                continue
            lo, hi = calibrate_range(h, self.method, self.percentile, qmax - qmin + 1)
            grids[v] = grid(lo, hi, qmin, qmax)
        return grids

    # --- edits -------------------------------------------------------------------------------
    def _emit(self, view: GraphView, chosen: list[Node], grids: dict, plan: Plan,
              means: dict) -> None:
        for v, (scale, zp) in grids.items():
            producer = view.producer(v)
            plan.edits.append(QuantizeValue(producer.name if producer else v, v, scale, zp,
                                            self.activations))
        for n in chosen:
            if n.kind not in (OpKind.CONV, OpKind.LINEAR):
                plan.stats[f"int8_{op_class(n)}"] += 1
                continue
            self._weights(view, n, grids, plan, means.get(n.name))
        plan.stats["quantized_values"] = len(grids)

    def _weights(self, view: GraphView, n: Node, grids: dict, plan: Plan,
                 mean: np.ndarray | None) -> None:
        w = view.param(n.name, "weight")
        ws = qm.weight_scales(w, self.weight_bits, self.per_channel)
        axis = 0 if self.per_channel else None
        zeros = np.zeros(ws.shape, np.int8)
        q = qm.quantize(w, ws, zeros, axis, "int8")
        plan.edits.append(QuantizeParam(n.name, "weight", q, ws, zeros, axis))
        x = grids.get(n.inputs[0])
        if "bias" in n.params and x is not None:
            b = view.param(n.name, "bias")
            if mean is not None:
                b = b - qm.bias_shift(w, qm.dequantize(q, ws, zeros, axis), mean,
                                      n.attrs.get("groups", 1))
                plan.edits.append(SetParam(n.name, "bias", b))  # fx keeps biases float
                plan.stats["bias_corrected"] += 1
            bs = qm.bias_scales(x[0], ws) * np.ones(len(b), np.float32)
            bz = np.zeros(len(b), np.int32)
            plan.edits.append(QuantizeParam(n.name, "bias", qm.quantize(b, bs, bz, 0, "int32"),
                                            bs, bz, 0))
        plan.stats[f"int8_{op_class(n)}"] += 1
        err = float(np.linalg.norm(qm.dequantize(q, ws, zeros, axis) - w) /
                    max(np.linalg.norm(w), 1e-30))
        plan.details.append({"node": n.name, "weight_rel_error": round(err, 6)})


def _float_output(view: GraphView, n: Node, out: str, chosen: set[str]) -> bool:
    """A linear layer whose output no quantized op reads keeps it float: ORT computes it as
    MatMulIntegerToFloat / QGemm with a float output, and a grid there would only add rounding
    (all-MiniLM-L6-v2: its FFN output's outlier features on a per-tensor grid took embedding
    cosine from 0.99 to 0.91)."""
    if n.kind is not OpKind.LINEAR:
        return False
    return not any(u.name in chosen or u.kind in _PASS_THROUGH for u in view.users(out))
