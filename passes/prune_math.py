"""Pure numpy helpers of prune-channels: channel importance and how many channels to keep.

Importance of a unit (a set of channels removed together) aggregates every tensor the unit
lives in: for each weight slice along a pruned axis, its L1 (sum |w|) or L2 (sqrt sum w^2) norm,
divided by the mean slice norm of that tensor so that a wide consumer does not outvote the
producer; a unit's score is the sum over its slices (Torch-Pruning's group importance, with the
per-tensor normalization of its `group_reduction="mean"` style). First-order Taylor (Molchanov et
al. 2017): |sum over the unit's weights of w * dL/dw|, summed over the slices.
"""

from __future__ import annotations

import numpy as np


def slice_norms(arr: np.ndarray, axis: int, p: int) -> np.ndarray:
    """Norm of every slice of `arr` along `axis` (p = 1 or 2)."""
    moved = np.moveaxis(np.asarray(arr, dtype=np.float64), axis, 0).reshape(arr.shape[axis], -1)
    return np.abs(moved).sum(1) if p == 1 else np.sqrt((moved ** 2).sum(1))


def slice_sums(arr: np.ndarray, axis: int) -> np.ndarray:
    """Signed sum of every slice along `axis` (Taylor: sum of w * grad over a channel)."""
    return np.moveaxis(np.asarray(arr, dtype=np.float64), axis, 0).reshape(
        arr.shape[axis], -1).sum(1)


def accumulate(units: np.ndarray, values: np.ndarray, scores: dict[int, float],
               normalize: bool = True) -> None:
    """Add `values` (one per position) to the score of each position's unit; positions of one
    unit inside one tensor count once per position, as their weights do."""
    values = np.asarray(values, dtype=np.float64)
    if normalize:
        mean = values.mean() if values.size else 0.0
        values = values / mean if mean > 0 else np.zeros_like(values)
    uniq, inv = np.unique(units, return_inverse=True)
    sums = np.zeros(len(uniq))
    np.add.at(sums, inv, values)
    for u, s in zip(uniq.tolist(), sums.tolist()):
        scores[u] = scores.get(u, 0.0) + s


def keep_count(n_units: int, ratio: float, step: int, min_keep: int) -> int:
    """Units to keep: n x (1 - ratio) rounded to a multiple of `step` (so channel counts stay a
    multiple of round-to), at least `min_keep`, never more than n."""
    want = n_units * (1.0 - ratio)
    keep = int(round(want / step)) * step
    keep = max(keep, min_keep, step if step <= n_units else n_units)
    return min(keep, n_units)


def lowest(units: np.ndarray, scores: dict[int, float], n_remove: int) -> np.ndarray:
    """The `n_remove` units of lowest score (ties broken by unit id, deterministic)."""
    if n_remove <= 0:
        return np.zeros(0, dtype=np.int64)
    vals = np.asarray([scores.get(int(u), 0.0) for u in units])
    order = np.lexsort((units, vals))
    return np.asarray(units)[order[:n_remove]]
