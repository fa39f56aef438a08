"""Pure weight math for exact convolution substitutions; no graph code.

- Block structure: a dense conv weight W (N, C, k...) is grouped with g groups when every
  output o of block b = o // (N/g) reads only inputs [b C/g, (b+1) C/g): then
      W_g[o, j] = W[o, b(o) C/g + j]     (N, C/g, k...)
  and the grouped conv computes the same outputs. Depthwise is g = C (channel multiplier N/C).
- Merging y = W2 (W1 x + b1) + b2 with W2 pointwise (1x1 / Linear) and no nonlinearity between:
      W[o, c, k] = sum_m W2[o, m] W1[m, c, k],    b = W2 b1 + b2
  exact whatever W1's padding: zero padding enters before W1, and both maps are linear.
"""

from __future__ import annotations

import numpy as np


def block_groups(weight: np.ndarray, tol: float = 0.0) -> int:
    """Largest g (dividing both channel counts) such that all weight outside the g diagonal
    blocks is within `tol` of zero (exact zeros by default); 1 if none."""
    n, c = weight.shape[:2]
    mass = np.abs(np.asarray(weight, np.float64)).reshape(n, c, -1).sum(axis=2)
    for g in sorted((d for d in range(2, min(n, c) + 1) if n % d == 0 and c % d == 0),
                    reverse=True):
        block = (np.arange(n)[:, None] // (n // g)) == (np.arange(c)[None, :] // (c // g))
        if np.all(mass[~block] <= tol):
            return g
    return 1


def to_grouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """W_g (N, C/g, k...) from a dense block-diagonal W (N, C, k...)."""
    n, c = weight.shape[:2]
    cg = c // groups
    cols = (np.arange(n) // (n // groups))[:, None] * cg + np.arange(cg)[None, :]
    return np.take_along_axis(np.asarray(weight), cols.reshape(n, cg, *[1] * (weight.ndim - 2)),
                              axis=1)


def off_block_mass(weight: np.ndarray, groups: int) -> float:
    """Share of |W| outside the diagonal blocks (0 for an exactly grouped weight)."""
    n, c = weight.shape[:2]
    mass = np.abs(np.asarray(weight, np.float64)).reshape(n, c, -1).sum(axis=2)
    block = (np.arange(n)[:, None] // (n // groups)) == (np.arange(c)[None, :] // (c // groups))
    total = mass.sum()
    return float(mass[~block].sum() / total) if total else 0.0


def merge_pointwise(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray,
                    b2: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(W, b) of W2 after W1; W2 is (O, M) or (O, M, 1, ...) pointwise, W1 (M, C, k...)."""
    w2m = np.asarray(w2, np.float64).reshape(w2.shape[0], w2.shape[1])
    w1 = np.asarray(w1, np.float64)
    w = np.tensordot(w2m, w1, axes=([1], [0]))
    if b1 is None and b2 is None:
        return w, None
    b = np.zeros(w2m.shape[0]) if b2 is None else np.asarray(b2, np.float64)
    if b1 is not None:
        b = b + w2m @ np.asarray(b1, np.float64)
    return w, b


def separable_factors(weight: np.ndarray, multiplier: int
                      ) -> tuple[np.ndarray, np.ndarray, float]:
    """Depthwise-separable fit of a dense conv W (N, C, kh, kw), least squares on the weights.

    For each input channel c, W[:, c] as an (N, kh*kw) matrix is approximated at rank m by its
    truncated SVD U S V^T (the Frobenius-optimal fit, Eckart-Young):
        depthwise (C*m, 1, kh, kw):  D[c*m + i] = sqrt(s_i) v_i      (groups = C)
        pointwise (N, C*m, 1, 1):    P[:, c*m + i] = sqrt(s_i) u_i
    so that sum_i P[n, c*m+i] D[c*m+i] = W[n, c]. Exact when m >= min(N, kh*kw).
    Returns (depthwise, pointwise, relative weight error).
    """
    w = np.asarray(weight, np.float64)
    n, c, kh, kw = w.shape
    m = min(multiplier, n, kh * kw)
    depth = np.zeros((c * multiplier, 1, kh, kw))
    point = np.zeros((n, c * multiplier, 1, 1))
    err2 = 0.0
    for ch in range(c):
        u, s, vt = np.linalg.svd(w[:, ch].reshape(n, kh * kw), full_matrices=False)
        root = np.sqrt(s[:m])
        depth[ch * multiplier:ch * multiplier + m, 0] = (root[:, None] * vt[:m]).reshape(
            m, kh, kw)
        point[:, ch * multiplier:ch * multiplier + m, 0, 0] = u[:, :m] * root[None, :]
        err2 += float(np.sum(s[m:] ** 2))
    norm2 = float(np.sum(w ** 2))
    return depth, point, float(np.sqrt(err2 / norm2)) if norm2 else 0.0
