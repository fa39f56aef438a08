"""The sensitivity mode of qdq (`max-error` > 0): which layers to keep in float.

1. Each conv / linear / matmul is quantized alone (everything else float) in a trial copy of
   the model, and the relative L2 error of the outputs on calibration samples is its
   sensitivity.
2. If quantizing everything exceeds the budget, the k most sensitive layers are kept float, the
   smallest k found by doubling then bisection (each step one trial of the whole model), so a
   model of N layers costs N + O(log N) trials.

Trials run on copies through the engine (`AnalysisManager.trial_outputs`): the plan stays a
plan, the model under optimization is only changed by the pass manager applying it.
"""

from __future__ import annotations

import logging

import numpy as np

from graphslim import data as data_mod
from graphslim.ir import OpKind
from graphslim.pass_manager import Plan
from graphslim.verify import compare

log = logging.getLogger(__name__)

_LAYERS = frozenset({OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL})
_TRIAL_SAMPLES = 16


def keep_float(edits_for, analyses, chosen, max_error: float, plan: Plan) -> set[str]:
    """Names of the layers to keep float; `edits_for(subset)` is qdq's plan quantizing only
    those nodes, run as a trial by the engine (AnalysisManager.trial_outputs)."""
    feeds = _feeds(analyses)
    refs = [analyses.model.run(f, deployed=True) for f in feeds]
    ref = {str(i): v for i, r in enumerate(refs) for v in r.values()}

    def error(subset) -> float:
        outs = analyses.trial_outputs(edits_for(subset), feeds)
        got = {str(i): v for i, o in enumerate(outs) for v in o.values()}
        return compare(ref, got).rel_l2

    total = error(chosen)
    layers = [n for n in chosen if n.kind in _LAYERS]
    if total <= max_error or not layers:
        plan.notes.append(f"sensitivity: all layers quantized, error {total:.4g} within "
                          f"max-error {max_error}")
        return set()
    alone = {n.name: error([m for m in chosen if m.kind not in _LAYERS or m is n])
             for n in layers}
    ranked = sorted(layers, key=lambda n: -alone[n.name])

    def without(k: int) -> float:
        drop = {n.name for n in ranked[:k]}
        return error([n for n in chosen if n.name not in drop])

    k, err = 1, without(1)
    while err > max_error and k < len(ranked):
        k = min(2 * k, len(ranked))
        err = without(k)
    lo = k // 2 + 1 if k > 1 else 1
    while lo < k:  # smallest k' in [lo, k] within budget (error falls with k, nearly always)
        mid = (lo + k) // 2
        e = without(mid)
        if e <= max_error:
            k, err = mid, e
        else:
            lo = mid + 1
    kept = ranked[:k]
    for n in kept:
        plan.skip(n.name, f"kept float by sensitivity: error {alone[n.name]:.4g} when quantized "
                  "alone")
    plan.notes.append(f"sensitivity: {len(kept)} of {len(layers)} layers kept float, error "
                      f"{err:.4g} (all quantized: {total:.4g}, max-error {max_error})")
    if err > max_error:
        plan.notes.append("sensitivity: the budget is not met even with every layer float "
                          "(the error comes from other quantized ops)")
    return {n.name for n in kept}


def weight_bits_by_error(plans: dict[int, Plan], analyses) -> tuple[int, dict[int, float]]:
    """The weight width whose plan gives the deployed model (ORT at opt level all: the integer
    kernels as they run on this CPU) the highest SQNR against the float model on calibration
    samples; ties go to more bits. Returns (bits, SQNR in dB by bits)."""
    feeds = _feeds(analyses)
    refs = [analyses.model.run(f, deployed=True) for f in feeds]
    ref = {str(i): v for i, r in enumerate(refs) for v in r.values()}
    sqnr = {}
    for bits, plan in plans.items():
        outs = analyses.trial_outputs(plan.edits, feeds)
        sqnr[bits] = compare(ref, {str(i): v for i, o in enumerate(outs)
                                   for v in o.values()}).sqnr_db
    best = max(sorted(plans, reverse=True), key=lambda b: sqnr[b])
    return best, sqnr


def _feeds(analyses) -> list[dict[str, np.ndarray]]:
    from graphslim.analyses.activations import data_or_synthetic

    source, _ = data_or_synthetic(analyses, "sensitivity trials")
    specs = analyses.model.input_specs()
    source = {k: np.asarray(v)[:_TRIAL_SAMPLES] for k, v in source.items()}
    return list(data_mod.batches(source, specs))
