"""Pure weight math for exact convolution substitutions; no graph code.

- Block structure: a dense conv weight W (N, C, k...) is grouped with g groups when every
  output o of block b = o // (N/g) reads only inputs [b C/g, (b+1) C/g): then
      W_g[o, j] = W[o, b(o) C/g + j]     (N, C/g, k...)
  and the grouped conv computes the same outputs. Depthwise is g = C (channel multiplier N/C).
- Merging y = W2 (W1 x + b1) + b2 with W2 pointwise (1x1 / Linear) and no nonlinearity between:
      W[o, c, k] = sum_m W2[o, m] W1[m, c, k],    b = W2 b1 + b2
  exact whatever W1's padding: zero padding enters before W1, and both maps are linear.
- Blocks under a reordering: W is grouped after reordering outputs by p and inputs by q when
  W[p][:, q] is block-diagonal. Exactly: the connected components of the bipartite graph
  "output o reads input c" (W[o, c] != 0) packed into g bins of N/g outputs and C/g inputs.
  Approximately (`best_blocks`): p, q maximising the squared weight inside the blocks, so that
  zeroing the rest is the least-squares grouped fit; the relative error is
  sqrt(outside mass / total mass).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


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


def _divisors(n: int, c: int) -> list[int]:
    return sorted((d for d in range(2, min(n, c) + 1) if n % d == 0 and c % d == 0),
                  reverse=True)


def permuted_blocks(weight: np.ndarray, tol: float = 0.0
                    ) -> tuple[int, np.ndarray, np.ndarray]:
    """(g, out_order, in_order) with the largest g such that W[out_order][:, in_order] is
    block-diagonal with g equal blocks (weights within `tol` of zero outside); (1, ...) if the
    components cannot be packed so. Packing is first-fit decreasing: exact for the equal-sized
    components of an expanded grouped conv, and it may miss an uneven packing (then g = 1)."""
    n, c = weight.shape[:2]
    nz = np.abs(np.asarray(weight, np.float64)).reshape(n, c, -1).sum(axis=2) > tol
    rows, cols = np.nonzero(nz)
    adj = coo_matrix((np.ones(len(rows)), (rows, n + cols)), shape=(n + c, n + c))
    count, label = connected_components(adj, directed=False)
    comps = [(np.flatnonzero(label[:n] == k), np.flatnonzero(label[n:] == k))
             for k in range(count)]
    comps.sort(key=lambda oc: (len(oc[0]) + len(oc[1])), reverse=True)
    for g in _divisors(n, c):
        outs_of, ins_of = [[] for _ in range(g)], [[] for _ in range(g)]
        room = [[n // g, c // g] for _ in range(g)]  # outputs, inputs still free per bin
        for outs, ins in comps:
            b = next((b for b in range(g) if room[b][0] >= len(outs) and room[b][1] >= len(ins)),
                     None)
            if b is None:
                break
            outs_of[b] += outs.tolist()
            ins_of[b] += ins.tolist()
            room[b][0] -= len(outs)
            room[b][1] -= len(ins)
        else:
            return (g, np.asarray(sum(outs_of, []), np.int64),
                    np.asarray(sum(ins_of, []), np.int64))
    return 1, np.arange(n), np.arange(c)


def _assign(score: np.ndarray, groups: int) -> np.ndarray:
    """Balanced assignment of rows to `groups` blocks (equal sizes) maximising the summed
    score[row, block]: a linear assignment with each block repeated size times (exact)."""
    size = score.shape[0] // groups
    rows, cols = linear_sum_assignment(-np.repeat(score, size, axis=1))
    block = np.empty(score.shape[0], np.int64)
    block[rows] = cols // size
    return block


def best_blocks(weight: np.ndarray, groups: int, fix_out: bool = False, fix_in: bool = False,
                restarts: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """(out_order, in_order, relative error) of the g-block grouping of W (N, C, k...) that
    keeps the most squared weight inside the blocks. Alternating maximisation: with the input
    blocks fixed, the best balanced output assignment is a linear assignment (exact), and vice
    versa; repeated to a fixed point from the identity and `restarts` random starts. A side
    that cannot be reordered (`fix_out` / `fix_in`) keeps its order (contiguous blocks)."""
    n, c = weight.shape[:2]
    mass = (np.asarray(weight, np.float64) ** 2).reshape(n, c, -1).sum(axis=2)
    total = mass.sum()
    rng = np.random.default_rng(seed)
    ident_out, ident_in = np.arange(n) // (n // groups), np.arange(c) // (c // groups)
    best = (ident_out, ident_in, -1.0)
    for start in range(restarts + 1):
        out_b = ident_out if start == 0 or fix_out else rng.permutation(ident_out)
        in_b = ident_in if start == 0 or fix_in else rng.permutation(ident_in)
        kept = -1.0
        for _ in range(50):
            if not fix_out:
                out_b = _assign(mass @ np.eye(groups)[in_b], groups)
            if not fix_in:
                in_b = _assign(mass.T @ np.eye(groups)[out_b], groups)
            now = float(mass[out_b[:, None] == in_b[None, :]].sum())
            if now <= kept + 1e-12 * total:
                break
            kept = now
        if kept > best[2]:
            best = (out_b, in_b, kept)
    out_b, in_b, kept = best
    error = float(np.sqrt(max(total - kept, 0.0) / total)) if total else 0.0
    return np.argsort(out_b, kind="stable"), np.argsort(in_b, kind="stable"), error
