"""Pure math of layer reconstruction (numpy); no graph code.

A layer computes y = W x + b on feature rows: a linear layer's input vectors, or a conv's
patches (im2col, per group). Given, on calibration data, the rows X the *compressed* model
feeds the layer (with a constant 1 appended where the layer has a bias) and the rows Y the
*original* model produced at the same point, the refit is the ridge regression towards the
current weights W0 (He et al. 2017, ThiNet 2017; the prior keeps a layer with few rows, e.g. a
7x7 feature map on 32 images, near the weights it has):

    W* = argmin ||X W - Y||^2 + lam ||W - W0||^2  =  (X^T X + lam I)^-1 (X^T Y + lam W0)

Only the Gram matrices G = X^T X, C = X^T Y and the column norms of Y are accumulated, batch by
batch in float64, so activations are never all held. The squared error of any W follows from
them: ||X W - Y||^2 = sum(Y^2) - 2 tr(W^T C) + tr(W^T G W). `lam` is chosen on held-out
calibration rows (a relative grid times the mean diagonal of G); a refit that does not beat W0
there is not taken.

Layouts: W here is (groups, features, outputs per group), features ordered (in-channel,
kernel offsets...) as the canonical conv weight (out, in/groups, *kernel) flattens, bias last.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

#: ridge strengths tried, relative to the mean diagonal of the Gram matrix
LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class Normal:
    """Accumulated normal equations of one layer, one system per group."""

    groups: int
    features: int
    outputs: int
    gram: np.ndarray = field(init=False)     # (g, F, F)
    cross: np.ndarray = field(init=False)    # (g, F, O)
    target_sq: np.ndarray = field(init=False)  # (g, O): sum of Y^2 per output
    rows: int = 0

    def __post_init__(self):
        self._pending: list = []
        self._pending_rows = 0
        g, f, o = self.groups, self.features, self.outputs
        self.gram = np.zeros((g, f, f))
        self.cross = np.zeros((g, f, o))
        self.target_sq = np.zeros((g, o))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x (rows, g, F), y (rows, g, O). Rows are buffered and folded into the matrices in
        blocks: a batch of one image may give a linear layer one row, and a rank-1 update of
        a large Gram matrix per row costs as much memory traffic as a block of a thousand."""
        self._pending.append((x, y))
        self._pending_rows += len(x)
        if self._pending_rows >= max(1024, self.features):
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate([p[0] for p in self._pending])
        y = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_rows = [], 0
        xt = np.ascontiguousarray(np.asarray(x, np.float64).transpose(1, 2, 0))  # (g, F, R)
        y = np.ascontiguousarray(np.asarray(y, np.float64).transpose(1, 0, 2))   # (g, R, O)
        self.gram += xt @ xt.transpose(0, 2, 1)  # batched BLAS (einsum's path is 10x slower)
        self.cross += xt @ y
        self.target_sq += (y * y).sum(axis=1)
        self.rows += xt.shape[2]

    def merged(self, other: Normal) -> Normal:
        self.flush()
        other.flush()
        out = Normal(self.groups, self.features, self.outputs)
        out.gram = self.gram + other.gram
        out.cross = self.cross + other.cross
        out.target_sq = self.target_sq + other.target_sq
        out.rows = self.rows + other.rows
        return out

    def error(self, w: np.ndarray) -> float:
        """sum ||X W - Y||^2 over groups and outputs, from the accumulated matrices."""
        self.flush()
        quad = np.einsum("gfo,gfh,gho->", w, self.gram, w, optimize=True)
        return float(self.target_sq.sum() - 2 * np.einsum("gfo,gfo->", w, self.cross) + quad)

    def energy(self) -> float:
        self.flush()
        return float(self.target_sq.sum())


def ridge(normal: Normal, w0: np.ndarray, lam: float) -> np.ndarray:
    """(G + lam' I)^-1 (C + lam' W0) per group, lam' = lam x mean diag(G)."""
    normal.flush()
    scale = np.einsum("gff->g", normal.gram) / normal.features
    out = np.empty_like(w0, dtype=np.float64)
    eye = np.eye(normal.features)
    for g in range(normal.groups):
        reg = lam * max(scale[g], 1e-12)
        out[g] = np.linalg.solve(normal.gram[g] + reg * eye, normal.cross[g] + reg * w0[g])
    return out


@dataclass(frozen=True)
class Refit:
    weights: np.ndarray | None   # (g, F, O), None: keep the layer as it is
    lam: float
    before: float                # relative error ||X W - Y|| / ||Y|| on the held-out rows
    after: float
    reason: str = ""


def choose_refit(fit: Normal, held: Normal, w0: np.ndarray, min_gain: float = 0.01) -> Refit:
    """Fit on `fit`, choose lam on `held` (the error of W0 there is the bar), refit on both."""
    energy = max(held.energy(), 1e-30)
    base = held.error(w0) / energy
    best = (base, None)
    for lam in LAMBDAS:
        try:
            err = held.error(ridge(fit, w0, lam)) / energy
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(err) and err < best[0]:
            best = (err, lam)
    before, after = float(np.sqrt(max(base, 0))), float(np.sqrt(max(best[0], 0)))
    if best[1] is None or not after < before * (1 - min_gain):
        return Refit(None, 0.0, before, after,
                     f"refit does not reduce the error on held-out calibration rows "
                     f"({before:.3g} -> {after:.3g})")
    return Refit(ridge(fit.merged(held), w0, best[1]), best[1], before, after)


def conv_output_size(spatial: tuple, kernel: tuple, strides: tuple, pads: tuple,
                     dilations: tuple) -> tuple[int, ...]:
    nd = len(kernel)
    return tuple((spatial[i] + pads[i] + pads[nd + i] - dilations[i] * (kernel[i] - 1) - 1)
                 // strides[i] + 1 for i in range(nd))


def sample_positions(samples: int, out: tuple, count: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, ...]:
    """Up to `count` random output positions per sample of a layer whose output has spatial
    size `out`: index arrays (n, *spatial), for output_rows and patch_rows."""
    total = int(np.prod(out))
    per = min(total, count)
    picks = np.stack([rng.choice(total, per, replace=False) for _ in range(samples)])
    return (np.repeat(np.arange(samples), per), *np.unravel_index(picks.reshape(-1), out))


def patch_rows(x: np.ndarray, kernel: tuple, strides: tuple, pads: tuple, dilations: tuple,
               groups: int, where: tuple) -> np.ndarray:
    """The conv patches of x (N, C, *spatial) that produce the output positions `where`:
    rows (R, g, F) with F = C/g x prod(kernel) (im2col of only the sampled positions)."""
    nd = len(kernel)
    c = x.shape[1]
    begins, ends = pads[:nd], pads[nd:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begins, ends)])
    samples, pos = where[0], where[1:]
    moved = np.moveaxis(xp, 1, -1)  # (N, *spatial, C): fancy indexing keeps C last
    cols = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        idx = tuple(p * s + o * d for p, s, o, d in zip(pos, strides, offs, dilations))
        cols.append(moved[(samples, *idx)])  # (R, C)
    patches = np.stack(cols, axis=-1)  # (R, C, K)
    return patches.reshape(len(samples), groups, (c // groups) * len(cols))


def output_rows(y: np.ndarray, where: tuple, groups: int) -> np.ndarray:
    """The layer output y (N, O, *spatial) at the positions `where`: (R, g, O/g)."""
    moved = np.moveaxis(y, 1, -1)
    rows = moved[where]
    return rows.reshape(len(rows), groups, rows.shape[-1] // groups)


def conv_weights(weight: np.ndarray, bias: np.ndarray | None, groups: int) -> np.ndarray:
    """Canonical conv weight (O, C/g, *k) (+ bias) as (g, F[+1], O/g)."""
    o = weight.shape[0]
    w = weight.reshape(groups, o // groups, -1).transpose(0, 2, 1)
    if bias is not None:
        w = np.concatenate([w, bias.reshape(groups, 1, o // groups)], axis=1)
    return np.asarray(w, np.float64)


def split_conv_weights(w: np.ndarray, shape: tuple, has_bias: bool
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of conv_weights: (weight in canonical layout, bias or None)."""
    bias = w[:, -1, :].reshape(-1) if has_bias else None
    core = w[:, :-1, :] if has_bias else w
    weight = core.transpose(0, 2, 1).reshape(shape)
    return weight, bias


def with_ones(rows: np.ndarray) -> np.ndarray:
    """Append the constant feature a bias multiplies: (R, g, F) -> (R, g, F + 1)."""
    return np.concatenate([rows, np.ones(rows.shape[:2] + (1,), rows.dtype)], axis=2)
