"""smooth-quant: move activation outliers into the weights before int8 (Xiao et al. 2023,
"SmoothQuant"), an exact rescaling.

Transformer activations have a few feature channels hundreds of times larger than the rest
(BERT's LayerNorm outputs), so a per-tensor uint8 grid spends its levels on them and rounds
everything else to a handful of steps. For the linear layers Y = X W^T that read one activation
X (features j), with a_j = max |X_j| over the calibration data and w_j = max |W[:, j]| over
every such layer:
    s_j = a_j^alpha / w_j^(1 - alpha),   X' = X / s,   W'[:, j] = W[:, j] s_j,
so X' W'^T = X W^T exactly in real arithmetic, and X' has channel ranges a_j^(1-alpha) w_j^alpha:
alpha = 0.5 evens activation and weight ranges (the paper's default for BERT-sized models).
X / s is a ScaleValue (one Mul by a constant per activation: in a post-LN transformer the
LayerNorm output also feeds the residual, which must read it unscaled); qdq then quantizes the
Mul's output, per tensor, for the linear layers only. A channel never seen non-zero, or whose
weights are all zero, keeps s = 1; s is bounded to [1e-4, 1e4].

Run on calibration data, immediately before `qdq` (`fold-bn,smooth-quant,qdq{ops=linear}`);
qdq's `mul` op then should not be selected (it would quantize the smoothing Mul itself).
Lossless: verified numerically. Skipped, with the reason: layers whose weight is shared with
another node. Preserves nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from graphslim.analyses.activations import LayerInputStats
from graphslim.edits import ScaleValue, SetParam
from graphslim.ir import GraphView, OpKind
from graphslim.pass_manager import Pass, Plan, register_pass

#: bound on one channel's smoothing factor (keeps weights far inside float32's normal range)
_MAX_SCALE = 1e4


def smoothing_scales(act_peak: np.ndarray, weight_peak: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1 - alpha) (module docstring), 1 where a_j or w_j is zero."""
    a = np.asarray(act_peak, np.float64)
    w = np.asarray(weight_peak, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1.0 / _MAX_SCALE, _MAX_SCALE)


@register_pass
@dataclass(frozen=True)
class SmoothActivations(Pass):
    name = "smooth-quant"
    lossless = True
    needs_data = True
    summary = "SmoothQuant: per-channel activation outliers moved into linear weights (exact)"
    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {self.alpha}")

    def plan(self, view: GraphView, analyses) -> Plan:
        plan = Plan()
        readers: dict[str, list] = defaultdict(list)
        for n in view.nodes():
            if n.kind is not OpKind.LINEAR or not n.inputs or "weight" not in n.params:
                continue
            if view.param_users(n.name, "weight") != (n.name,):
                plan.skip(n.name, "smooth-quant: its weight is shared with another node")
                continue
            readers[n.inputs[0]].append(n)
        if not readers:
            return plan
        ranges = analyses.get(LayerInputStats)
        if ranges.synthetic:
            plan.notes.append("smooth-quant: activation ranges from synthetic inputs")
        outliers = []
        for value, layers in readers.items():
            weights = {n.name: view.param(n.name, "weight") for n in layers}
            peak = ranges.peaks.get(layers[0].name)
            if peak is None or any(w.shape[1] != len(peak) for w in weights.values()):
                for n in layers:
                    plan.skip(n.name, "smooth-quant: no per-feature range of its input")
                continue
            w_peak = np.max([np.abs(w).max(0) for w in weights.values()], axis=0)
            s = smoothing_scales(peak, w_peak, self.alpha)
            for name, w in weights.items():
                plan.edits.append(SetParam(name, "weight", (w * s[None, :]).astype(w.dtype)))
            producer = view.producer(value)
            plan.edits.append(ScaleValue(producer.name if producer else value, value,
                                         (1.0 / s).astype(np.float32),
                                         tuple(n.name for n in layers)))
            live = peak[peak > 0]
            outliers.append(float(live.max() / np.median(live)) if live.size else 1.0)
        plan.stats["activations"] = len(outliers)
        plan.stats["layers"] = sum(len(v) for v in readers.values())
        if outliers:
            plan.notes.append(f"smooth-quant: {len(outliers)} activations, largest channel "
                              f"peak / median peak up to {max(outliers):.0f}x before smoothing "
                              f"(alpha {self.alpha}, {ranges.samples} samples)")
        return plan
