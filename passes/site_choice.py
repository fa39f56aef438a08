"""Choosing a rewrite per site by measured latency (`choose=latency`), shared by the
conv-substitute family: the site as it is and as it would be, each timed on ONNX Runtime CPU
in layout context (graphslim/sites.py: between identity depthwise convs that keep ORT's NCHWc
layout, so a form that leaves the layout pays the reorders it pays in the model), at the
model's batch or `batch`. A rewrite goes ahead only when it is at least `min-gain` faster; the
timings land in the site's details, a refusal in the skips with both timings."""

from __future__ import annotations

from collections.abc import Sequence

from graphslim.edits import Layer
from graphslim.pass_manager import Plan

CHOOSERS = ("cost", "latency")


def check_choice(choose: str, min_gain: float, batch: int) -> None:
    if choose not in CHOOSERS:
        raise ValueError(f"choose must be one of {', '.join(CHOOSERS)}, not '{choose}'")
    if not 0 <= min_gain < 1 or batch < 0:
        raise ValueError("min-gain must be in [0, 1) and batch >= 0 (0: the model's)")


def latency_allows(node: str, what: str, before: Sequence[Layer], after: Sequence[Layer],
                   in_shape: tuple | None, batch: int, min_gain: float, plan: Plan,
                   detail: dict) -> bool:
    """Whether `after` runs at least `min_gain` faster than `before` at this site."""
    from graphslim.sites import measure_chain

    if not in_shape:
        plan.skip(node, f"{what}: input shape unknown, cannot be measured")
        return False
    shape = tuple(in_shape) if not batch else (batch, *in_shape[1:])
    t_before, t_after = measure_chain(before, after, shape, context=True)
    detail.update(ms_before=round(t_before.median * 1e3, 4),
                  ms_after=round(t_after.median * 1e3, 4), measured_shape=list(shape))
    if t_after.median <= (1 - min_gain) * t_before.median:
        return True
    plan.skip(node, f"{what}: measured {t_after} vs {t_before} on ORT CPU at input "
              f"{list(shape)}, not {min_gain:.0%} faster")
    return False
