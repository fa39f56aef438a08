"""Pure numpy weight math for folding BatchNorm; no graph code here.

Inference BatchNorm is a per-channel affine map:
    BN(x)[c] = s[c] * x[c] + t[c],   s = gamma / sqrt(var + eps),   t = beta - mean * s
Everything is computed in float64; the frontend casts back to the model's dtype.
"""

from __future__ import annotations

import numpy as np


def bn_affine(mean: np.ndarray, var: np.ndarray, eps: float, scale: np.ndarray | None = None,
              bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = s * x + t per channel; a missing affine means gamma = 1, beta = 0."""
    mean = np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    gamma = np.ones_like(mean) if scale is None else np.asarray(scale, np.float64)
    beta = np.zeros_like(mean) if bias is None else np.asarray(bias, np.float64)
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _out_axis_view(weight: np.ndarray, transpose_conv: bool, groups: int) -> np.ndarray:
    """Weight reshaped so axis 0 indexes output channels (handles ConvTranspose with groups)."""
    if not transpose_conv:
        return weight
    cin, cout_g = weight.shape[:2]
    k = weight.shape[2:]
    # (in, out/g, k) -> (g, in/g, out/g, k) -> (g, out/g, in/g, k) -> (out, in/g, k)
    w = weight.reshape(groups, cin // groups, cout_g, *k).swapaxes(1, 2)
    return w.reshape(groups * cout_g, cin // groups, *k)


def _from_out_axis_view(w: np.ndarray, like: np.ndarray, groups: int) -> np.ndarray:
    cin, cout_g = like.shape[:2]
    k = like.shape[2:]
    return w.reshape(groups, cout_g, cin // groups, *k).swapaxes(1, 2).reshape(like.shape)


def fold_into_output(weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
                     transpose_conv: bool = False, groups: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Fold y' = s * y + t (per output channel) into y = W * x + b.

        W'[o, ...] = s[o] * W[o, ...],   b' = s * b + t

    Conv weights are (out, in/g, k...), Linear (out, in); ConvTranspose weights are
    (in, out/g, k...) and are rearranged so that the scale hits output channel o = g*(out/g) + j.
    """
    w = np.asarray(weight, np.float64)
    b = np.zeros(len(s)) if bias is None else np.asarray(bias, np.float64)
    wo = _out_axis_view(w, transpose_conv, groups)
    if wo.shape[0] != len(s):
        raise ValueError(f"BN has {len(s)} channels but the layer has {wo.shape[0]} outputs")
    wo = wo * s.reshape(-1, *([1] * (wo.ndim - 1)))
    w_new = _from_out_axis_view(wo, w, groups) if transpose_conv else wo
    return w_new, s * b + t


def fold_into_input(weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
                    groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold x' = s * x + t (per input channel) into a following y = W * x' + b.

        W'[o, j, ...] = W[o, j, ...] * s[c(o, j)]
        b'[o]         = b[o] + sum_{j, k} W[o, j, k] * t[c(o, j)]
    where c(o, j) = (o // (out/g)) * (in/g) + j is the input channel that weight slot j of output o
    reads (grouped / depthwise conv); for Linear (out, in) groups = 1 and c = j. The bias term is
    exact for a conv only if every output sees every kernel tap of real data: no zero padding
    (or t = 0); the caller checks that.
    """
    w = np.asarray(weight, np.float64)
    out, in_g = w.shape[:2]
    if in_g * groups != len(s):
        raise ValueError(f"BN has {len(s)} channels but the layer reads {in_g * groups}")
    group_of_out = np.arange(out) // (out // groups)
    channel = group_of_out[:, None] * in_g + np.arange(in_g)[None, :]  # (out, in/g)
    extra = (1,) * (w.ndim - 2)
    w_new = w * s[channel].reshape(out, in_g, *extra)
    b = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    shift = (w * t[channel].reshape(out, in_g, *extra)).reshape(out, -1).sum(axis=1)
    return w_new, b + shift
