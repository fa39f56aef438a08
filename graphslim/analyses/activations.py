"""Activation statistics gathered by running the graph on the user's data, streaming.

`LayerInputGram`: for every LINEAR node and 1x1 CONV node, the Gram matrix X^T X of its input
features (one row per token / pixel), accumulated batch by batch in float64, never holding more
than one batch of activations. Used by data-aware low-rank factorization. Without user data the
seeded verification inputs stand in (logged): statistics of synthetic inputs, stated as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from graphslim import data as data_mod
from graphslim.analyses import Analysis, AnalysisManager
from graphslim.ir import OpKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gram:
    matrix: np.ndarray  # (features, features), sum of x x^T
    rows: int
    synthetic: bool


def data_or_synthetic(am: AnalysisManager, what: str) -> tuple:
    """The user's data, or the seeded verification inputs (logged) when there is none."""
    if am.data is not None:
        return am.data, False
    from graphslim.verify import make_inputs

    log.warning("no data given: %s come from synthetic inputs", what)
    return make_inputs(am.model.input_specs()), True


def _is_pointwise(node) -> bool:
    if node.kind is OpKind.LINEAR:
        return True
    return node.kind is OpKind.CONV and node.attrs.get("groups", 1) == 1 and all(
        k == 1 for k in node.attrs.get("kernel_shape", ()))


class LayerInputGram(Analysis):
    name = "layer-input-gram"

    @classmethod
    def compute(cls, am: AnalysisManager) -> dict[str, Gram]:
        view = am.view
        nodes = [n for n in view.nodes() if _is_pointwise(n) and n.inputs]
        if not nodes:
            return {}
        specs = am.model.input_specs()
        source, synthetic = data_or_synthetic(am, "activation statistics")
        grams: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        values = sorted({n.inputs[0] for n in nodes})
        for feeds in data_mod.batches(source, specs):
            acts = am.model.capture(feeds, values)
            for n in nodes:
                x = np.asarray(acts[n.inputs[0]], np.float64)
                x = np.moveaxis(x, 1, -1) if n.kind is OpKind.CONV else x
                x = x.reshape(-1, x.shape[-1])
                grams[n.name] = grams.get(n.name, 0.0) + x.T @ x
                rows[n.name] = rows.get(n.name, 0) + len(x)
        return {k: Gram(g, rows[k], synthetic) for k, g in grams.items()}


@dataclass(frozen=True)
class Saliency:
    """Per parameter key, w * dL/dw with one row per chunk of the data (fx), or per node, the
    mean |x| of each input channel of a conv / linear (ONNX proxy); `kind` says which."""

    kind: str                       # "taylor" | "activation"
    values: dict[str, np.ndarray]
    synthetic: bool
    loss: str


class TaylorSaliency(Analysis):
    """First-order Taylor terms for channel importance (Molchanov et al. 2017). The fx frontend
    backpropagates the loss (cross-entropy against data["labels"] when given, else the output's
    squared norm, stated in `loss`); frontends without gradients (ONNX) give the mean absolute
    input activation per channel of every conv / linear instead, an activation proxy."""

    name = "taylor-saliency"

    @classmethod
    def compute(cls, am: AnalysisManager) -> Saliency:
        specs = am.model.input_specs()
        source, synthetic = data_or_synthetic(am, "taylor saliency")
        labels = None if synthetic else source.get(data_mod.LABELS)
        if am.model.has_gradients:
            feeds = list(data_mod.batches(source, specs, size=64))  # torch takes any batch
            values, loss = am.model.weight_gradient_products(feeds, labels)
            return Saliency("taylor", values, synthetic, loss)
        return Saliency("activation", _mean_abs_inputs(am, source, specs), synthetic,
                        "none (activation proxy)")


def _mean_abs_inputs(am: AnalysisManager, source, specs) -> dict[str, np.ndarray]:
    nodes = [n for n in am.view.nodes() if n.kind in (OpKind.CONV, OpKind.LINEAR) and n.inputs]
    values = sorted({n.inputs[0] for n in nodes})
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feeds in data_mod.batches(source, specs):
        acts = am.model.capture(feeds, values)
        count += 1
        for n in nodes:
            x = np.abs(np.asarray(acts[n.inputs[0]], np.float64))
            axis = 1 if n.kind is OpKind.CONV else x.ndim - 1
            per = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).mean(1)
            sums[n.name] = sums.get(n.name, 0.0) + per
    return {k: v / max(count, 1) for k, v in sums.items()}


@dataclass(frozen=True)
class InputStats:
    """Per CONV / LINEAR node, over the data: of each input channel (a conv's axis 1, a
    linear's last axis), the mean and max |x|."""

    means: dict[str, np.ndarray]
    peaks: dict[str, np.ndarray]
    samples: int
    synthetic: bool


class LayerInputStats(Analysis):
    """Per-channel mean and max |x| of every CONV / LINEAR node's data input, streamed batch by
    batch (qdq's bias correction reads the means, smooth-quant the peaks)."""

    name = "layer-input-stats"

    @classmethod
    def compute(cls, am: AnalysisManager) -> InputStats:
        specs = am.model.input_specs()
        source, synthetic = data_or_synthetic(am, "activation statistics")
        nodes = [n for n in am.view.nodes() if n.kind in (OpKind.CONV, OpKind.LINEAR)
                 and n.inputs]
        axis = {n.inputs[0]: 1 if n.kind is OpKind.CONV else -1 for n in nodes}
        sums: dict[str, np.ndarray] = {}
        peaks: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        count = 0
        for feeds in data_mod.batches(source, specs):
            acts = am.model.capture(feeds, list(axis)) if axis else {}
            count += len(next(iter(feeds.values())))
            for v, ax in axis.items():
                x = np.asarray(acts[v], np.float32)
                x = np.moveaxis(x, ax, -1).reshape(-1, x.shape[ax])
                s, peak = x.sum(0, dtype=np.float64), np.abs(x).max(0)
                sums[v] = sums[v] + s if v in sums else s
                peaks[v] = np.maximum(peaks[v], peak) if v in peaks else peak
                rows[v] = rows.get(v, 0) + len(x)
        keep = [n for n in nodes if n.inputs[0] in sums]
        return InputStats({n.name: sums[n.inputs[0]] / rows[n.inputs[0]] for n in keep},
                          {n.name: peaks[n.inputs[0]] for n in keep}, count, synthetic)
