"""Allocating per-target settings (a ratio per channel group) to meet a budget with the least
loss, from measured curves: a multiple-choice knapsack, solved by the greedy that repeatedly
takes the step of least loss per unit saved (any jump to a higher level of one target, so a
level whose saving is lost in timing noise does not stop the next). Savings are taken as
additive across targets; callers check the allocation by measuring it (they are not additive:
a conv between two pruned groups saves 1 - (1-r1)(1-r2)).

A table is {key: {"levels": [...], "saved": [...], "loss": [...]}}, levels ascending, saved and
loss measured at each level against the unpruned model (at level 0 both are 0).
"""

from __future__ import annotations

import numpy as np


def monotone(values) -> list[float]:
    """Running maximum: a curve measured with noise, made non-decreasing in the level."""
    return [float(v) for v in np.maximum.accumulate(np.asarray(values, dtype=float))] \
        if len(values) else []


def with_midpoints(levels, saved, loss) -> dict:
    """The measured levels with the midpoints between them (and below the first) linearly
    interpolated: finer steps for the greedy, whose choice the caller's measurement checks."""
    xs, ss, ls = [0.0, *levels], [0.0, *saved], [0.0, *loss]
    out = {"levels": [], "saved": [], "loss": []}
    for k in range(1, len(xs)):
        for x, s_, l_ in (((xs[k - 1] + xs[k]) / 2, (ss[k - 1] + ss[k]) / 2,
                           (ls[k - 1] + ls[k]) / 2), (xs[k], ss[k], ls[k])):
            out["levels"].append(round(x, 4))
            out["saved"].append(round(float(s_), 6))
            out["loss"].append(float(l_))
    return out


def greedy(table: dict, need: float) -> dict:
    """key -> level: the cheapest steps (loss per unit saved) until the predicted saving
    reaches `need`; keys left at level 0 are absent."""
    at = {k: -1 for k in table}  # index into the key's levels; -1: untouched
    saved = 0.0
    while saved < need:
        best = None
        for k, t in table.items():
            s0 = t["saved"][at[k]] if at[k] >= 0 else 0.0
            l0 = t["loss"][at[k]] if at[k] >= 0 else 0.0
            for j in range(at[k] + 1, len(t["levels"])):
                gain = t["saved"][j] - s0
                if gain <= 0:
                    continue
                rate = (t["loss"][j] - l0) / gain
                if best is None or rate < best[0]:
                    best = (rate, k, j, gain)
        if best is None:
            break
        _, k, j, gain = best
        at[k] = j
        saved += gain
    return {k: table[k]["levels"][j] for k, j in at.items() if j >= 0}
