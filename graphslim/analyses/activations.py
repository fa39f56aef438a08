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
        synthetic = am.data is None
        if synthetic:
            log.warning("no data given: activation statistics come from synthetic inputs")
            from graphslim.verify import make_inputs
            source = make_inputs(specs)
        else:
            source = am.data
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
