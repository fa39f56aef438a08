"""Pure weight math for low-rank factorization (numpy + tensorly, numpy backend); no graph code.

Notation: a conv weight W has shape (N, C, kh, kw) (out, in, kernel); a linear weight (N, C).
Every factorization returns the new layers' weights in that canonical layout, first layer first.

- SVD (linear / 1x1 conv):   W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T): layers C->r, r->N (bias last).
- Spatial SVD (Jaderberg et al. 2014): M[(c,i), (n,j)] = W[n, c, i, j] ~= A B with rank r:
      layer 1: (r, C, kh, 1)  A[(c,i), r]        layer 2: (N, r, 1, kw)  B[r, (n,j)]
- Tucker-2 (Kim et al. 2016), one-shot HOSVD (Tucker2Basis) with optional HOOI refinement:
      W ~= G x_0 U_out x_1 U_in,  U_out (N, r_out), U_in (C, r_in), G (r_out, r_in, kh, kw):
      layers 1x1 C->r_in (U_in^T), KxK r_in->r_out (G), 1x1 r_out->N (U_out) + bias.
- CP (Lebedev et al. 2015): W ~= sum_r a_r (x) b_r (x) c_r (x) d_r (tensorly parafac):
      layers 1x1 C->R (b), depthwise kh x 1 (c), depthwise 1 x kw (d), 1x1 R->N (a) + bias.
All are exact at full rank except CP (CP rank has no finite "full" value in general). The first
layers carry no bias, so zero padding stays exact: a zero input maps to zero.
"""

from __future__ import annotations

import numpy as np
import tensorly as tl
from tensorly.decomposition import parafac, partial_tucker
from tensorly.tenalg import multi_mode_dot, svd_interface

# Above this size of the smaller side, a truncated SVD goes through the eigendecomposition of the
# smaller Gram matrix: a full SVD of VGG16's 4096 x 25088 fc6 took ~90 s here. Hand-written
# because tensorly 0.10's symeig_svd eigendecomposes the *larger* Gram matrix (25088^2 for fc6)
# and crashed (segfault) here.
_GRAM_ABOVE = 1024


def _gram_svd(m: np.ndarray, rank: int, gram: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.linalg import eigh

    flip = m.shape[0] > m.shape[1]
    a = m.T if flip else m  # a is (small, large)
    n = a.shape[0]
    s2, u = eigh(a @ a.T if gram is None else gram, subset_by_index=[n - rank, n - 1],
                 driver="evr")
    s2, u = s2[::-1], u[:, ::-1]
    s = np.sqrt(np.clip(s2, 0.0, None))
    keep = s > s[0] * 1e-12 if s.size and s[0] > 0 else np.zeros_like(s, bool)
    vt = np.zeros((rank, a.shape[1]))
    vt[keep] = (u[:, keep].T @ a) / s[keep, None]
    return (vt.T, s, u.T) if flip else (u, s, vt)


def left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All left singular vectors and values (U, S) of a wide matrix, from the eigendecomposition
    of M M^T: what HOSVD needs, without the right vectors (half the work on conv unfoldings)."""
    m = np.asarray(matrix, np.float64)
    if m.shape[0] > m.shape[1]:
        u, s, _ = svd(m)
        return u, s
    s2, u = np.linalg.eigh(m @ m.T)
    return u[:, ::-1], np.sqrt(np.clip(s2[::-1], 0.0, None))


def svd(matrix: np.ndarray, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (m, r), S (r,), Vt (r, n) of a float64 copy, largest singular values first. Very
    rectangular or large matrices go through the smaller Gram matrix (several times faster for
    conv unfoldings such as 512 x 4608; float64 keeps the leading subspace accurate)."""
    m = np.asarray(matrix, np.float64)
    rank = min(rank or min(m.shape), min(m.shape))
    if min(m.shape) > _GRAM_ABOVE or max(m.shape) >= 4 * min(m.shape):
        return _gram_svd(m, rank)
    return svd_interface(m, method="truncated_svd", n_eigenvecs=rank, flip_sign=True)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, np.float64)
    if min(m.shape) > _GRAM_ABOVE:
        small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        return np.sqrt(np.clip(np.linalg.eigvalsh(small)[::-1], 0.0, None))
    return np.linalg.svd(m, compute_uv=False)


def unfold(weight: np.ndarray, mode: int) -> np.ndarray:
    return tl.unfold(np.asarray(weight, np.float64), mode)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    w = np.asarray(weight, np.float64)
    norm = np.linalg.norm(w)
    return float(np.linalg.norm(w - approx) / norm) if norm > 0 else 0.0


class Tucker2Basis:
    """Full HOSVD bases of a conv weight, computed once; every (r_out, r_in) truncation is then
    a slice, and its error follows from norms: the truncation is an orthogonal projection, so
    ||W - W_r||^2 = ||W||^2 - ||core_r||^2."""

    def __init__(self, weight: np.ndarray):
        w = np.asarray(weight, np.float64)
        self.u_out, self.s_out = left_singular(unfold(w, 0))
        self.u_in, self.s_in = left_singular(unfold(w, 1))
        self.core = multi_mode_dot(w, [self.u_out.T, self.u_in.T], modes=[0, 1])
        self.norm2 = float(np.sum(w ** 2))

    def error(self, r_out: int, r_in: int) -> float:
        kept = float(np.sum(self.core[:r_out, :r_in] ** 2))
        return float(np.sqrt(max(self.norm2 - kept, 0.0) / self.norm2)) if self.norm2 else 0.0

    def factors(self, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U_in^T (r_in, C), core (r_out, r_in, kh, kw), U_out (N, r_out))."""
        return (self.u_in[:, :r_in].T, self.core[:r_out, :r_in], self.u_out[:, :r_out])

    def refined(self, weight: np.ndarray, r_out: int, r_in: int, iters: int
                ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]:
        """HOOI (tensorly's partial_tucker) started from this HOSVD truncation:
        (factors as in `factors`, relative error)."""
        w = np.asarray(weight, np.float64)
        first, core, last = self.factors(r_out, r_in)
        (core, (u_out, u_in)), _ = partial_tucker(
            w, rank=[r_out, r_in], modes=[0, 1], n_iter_max=iters,
            init=(core, [last, first.T]), tol=1e-8)
        core = multi_mode_dot(w, [u_out.T, u_in.T], modes=[0, 1])
        recon = multi_mode_dot(core, [u_out, u_in], modes=[0, 1])
        return (u_in.T, core, u_out), relative_error(w, recon)


class SVDBasis:
    """SVD of a matrix for rank selection: all singular values up front (errors and energy are
    prefix sums), singular vectors only for the ranks asked for. Large or very rectangular
    matrices keep their smaller Gram matrix, so every rank costs one partial eigendecomposition
    (VGG16's fc6: ~12 s instead of ~50 s for full vectors)."""

    def __init__(self, matrix: np.ndarray):
        self.m = np.asarray(matrix, np.float64)
        small, large = sorted(self.m.shape)
        self._gram = None
        if small > _GRAM_ABOVE or large >= 4 * small:
            a = self.m if self.m.shape[0] <= self.m.shape[1] else self.m.T
            self._gram = a @ a.T
            self.s = np.sqrt(np.clip(np.linalg.eigvalsh(self._gram)[::-1], 0.0, None))
        else:
            self.s = np.linalg.svd(self.m, compute_uv=False)
        total = float(np.sum(self.s ** 2))
        self._tail = (total - np.concatenate([[0.0], np.cumsum(self.s ** 2)])) / (total or 1.0)
        self._factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def error(self, rank: int) -> float:
        return float(np.sqrt(max(self._tail[rank], 0.0)))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A (m, r), B (r, n)) with A B the rank-r approximation, sqrt(S) on both sides."""
        if rank not in self._factors:
            u, s, vt = _gram_svd(self.m, rank, self._gram) if self._gram is not None else \
                svd(self.m, rank)
            root = np.sqrt(s)
            self._factors[rank] = (u * root[None, :], root[:, None] * vt)
        return self._factors[rank]


class WhitenedSVDBasis(SVDBasis):
    """Data-aware SVD of W (N, C) for inputs with second moment G = X^T X / rows:
    min ||(W - W_r) X^T|| is the SVD of W L with G = L L^T (Cholesky), mapped back by L^-1:
        W L = U S V^T,   first = sqrt(S_r) V_r^T L^-1 (r, C),   second = U_r sqrt(S_r) (N, r).
    `error(r)` is then the relative *output* error on that data. A ridge of 1e-6 x mean
    eigenvalue keeps G invertible (dead input features)."""

    def __init__(self, weight: np.ndarray, gram: np.ndarray, rows: int, damp: float = 0.01):
        g = np.asarray(gram, np.float64) / max(rows, 1)
        g = g + np.eye(len(g)) * (damp * np.trace(g) / len(g) + 1e-12)
        self.chol = np.linalg.cholesky(g)
        super().__init__(np.asarray(weight, np.float64) @ self.chol)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        from scipy.linalg import solve_triangular

        a, b = super().factors(rank)
        # b L^-1 = (L^-T b^T)^T
        return a, solve_triangular(self.chol, b.T, trans="T", lower=True).T


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """M[(c, i), (n, j)] = W[n, c, i, j]."""
    n, c, kh, kw = weight.shape
    return np.asarray(weight, np.float64).transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def spatial_layers(a: np.ndarray, b: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Factors of spatial_matrix (A (C*kh, r), B (r, N*kw)) as (r, C, kh, 1) and (N, r, 1, kw)."""
    n, c, kh, kw = shape
    return (a.reshape(c, kh, -1).transpose(2, 0, 1)[..., None],
            b.reshape(-1, n, kw).transpose(1, 0, 2)[:, :, None, :])


def cp_factors(weight: np.ndarray, rank: int, n_iter: int = 50, seed: int = 0
               ) -> tuple[list[np.ndarray], np.ndarray]:
    """([a (N, R) with the CP weights folded in, b (C, R), c (kh, R), d (kw, R)], recon)."""
    w = np.asarray(weight, np.float64)
    cp = parafac(w, rank=rank, init="svd" if rank <= min(w.shape[:2]) else "random",
                 n_iter_max=n_iter, random_state=seed, tol=1e-7)
    weights, (a, b, c, d) = cp
    a = a * weights[None, :]
    recon = tl.cp_to_tensor((np.ones(rank), [a, b, c, d]))
    return [a, b, c, d], recon


# --- rank selection ---------------------------------------------------------------------------

def energy_rank(singular: np.ndarray, energy: float) -> int:
    """Smallest r keeping `energy` of sum(s_i^2) (the Frobenius share, as PCA's explained
    variance). On the trained all-MiniLM-L6-v2 encoder 0.9 in every linear layer halves linear
    MACs but leaves sentence-embedding cosine at ~0.6: that model needs energy close to 1, data
    or fine-tuning (tests/test_factorize_minilm.py prints the trade-off)."""
    power = np.cumsum(np.asarray(singular, np.float64) ** 2)
    if power[-1] <= 0:
        return 1
    return int(np.searchsorted(power / power[-1], energy - 1e-12) + 1)


def evbmf_rank(matrix: np.ndarray) -> int:
    """Rank chosen by empirical Variational Bayesian Matrix Factorization (Nakajima et al.
    2013, the analytic global solution; noise variance estimated). Written here because no
    maintained package offers it. Can be 0 on untrained weights: callers clamp."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(matrix, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = singular_values(y)
    alpha = L / M
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(float(np.sum(y ** 2) - np.sum(s ** 2)), 0.0)
    eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = (np.sum(s ** 2) + residual) / (L * M)
    lower = max(s[eh_ub + 1] ** 2 / (M * x_bar) if eh_ub + 1 < L else 0.0,
                np.mean(s[eh_ub + 1:] ** 2) / M if eh_ub + 1 < L else 0.0)
    if not upper > lower > 0:
        return len(s)

    def objective(sigma2):
        x = s ** 2 / (M * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
                + alpha * np.sum(np.log(tau / alpha + 1)) + residual / (M * sigma2)
                + (L - len(s)) * np.log(sigma2))

    sigma2 = minimize_scalar(objective, bounds=(lower, upper), method="bounded").x
    threshold = np.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


def round_rank(rank: float, full: int, multiple: int) -> int:
    """Round up to a multiple of `multiple` (kernels stay efficient), within [1, full]."""
    r = int(np.ceil(max(rank, 1) / multiple) * multiple) if multiple > 1 else int(round(rank))
    return int(min(max(r, 1), full))
