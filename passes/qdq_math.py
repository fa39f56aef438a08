"""Weight math of int8 quantization (pure numpy; the graph walk is in passes/qdq.py).

Affine quantization (ONNX QuantizeLinear / DequantizeLinear):
    q = clip(round(x / s) + z, qmin, qmax)        x~ = (q - z) * s
Weights: symmetric per output channel, z = 0, s_c = max|W_c| / qmax with qmax = 2^(bits-1) - 1
(the grid [-qmax, qmax] avoids -2^(bits-1), so a negated weight stays representable).
Bias of a quantized conv / linear: int32 with s_c = s_x * s_w,c and z = 0, which is what ONNX
Runtime's integer kernels accumulate into (QLinearConv's bias input).
"""

from __future__ import annotations

import numpy as np

INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2 ** 31), 2 ** 31 - 1)}


def weight_scales(w: np.ndarray, bits: int = 8, per_channel: bool = True) -> np.ndarray:
    """Symmetric scales: one per output channel (axis 0) or a 1-element array (per tensor)."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float64)
    amax = np.abs(w).reshape(len(w), -1).max(1) if per_channel else np.array([np.abs(w).max()])
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None,
             dtype: str) -> np.ndarray:
    """Integer tensor q = clip(round(x / s) + z) (round half to even, as ONNX specifies)."""
    x = np.asarray(x, np.float64)
    s, z = _along(scale, x, axis), _along(zero_point, x, axis)
    lo, hi = INT_RANGES[dtype]
    return np.clip(np.rint(x / s) + z, lo, hi).astype(dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
               axis: int | None) -> np.ndarray:
    q = np.asarray(q, np.float64)
    return ((q - _along(zero_point, q, axis)) * _along(scale, q, axis)).astype(np.float32)


def fake_quantize(x, scale, zero_point, axis, dtype) -> np.ndarray:
    """x after a quantize / dequantize round trip: what the quantized model computes with.
    (Weights below 8 bits are int8 values on a coarser symmetric grid: their scales bound
    |q| by 2^(bits-1) - 1.)"""
    return dequantize(quantize(x, scale, zero_point, axis, dtype), scale, zero_point, axis)


def bias_scales(input_scale: float, w_scales: np.ndarray) -> np.ndarray:
    return (np.float64(input_scale) * np.asarray(w_scales, np.float64)).astype(np.float32)


def bias_shift(w: np.ndarray, w_quantized: np.ndarray, input_mean: np.ndarray,
               groups: int = 1) -> np.ndarray:
    """Expected output change per output channel from quantizing the weight, on inputs of
    per-channel mean E[x] (Nagel et al. 2019, "Data-Free Quantization", empirical bias
    correction): E[y~ - y]_o = sum over its input channels c and taps k of
    (W~ - W)[o, c, k] E[x_c]; a grouped conv's output o reads its group's input channels.
    Zero padding at the borders is ignored (as in the paper). Subtracting it from the bias
    removes the mean error; the per-sample error stays."""
    dw = np.asarray(w_quantized, np.float64) - np.asarray(w, np.float64)
    dw = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(2)  # (out, in/groups)
    mean = np.asarray(input_mean, np.float64).reshape(groups, dw.shape[1])
    per_group = dw.shape[0] // groups
    return np.concatenate([dw[g * per_group:(g + 1) * per_group] @ mean[g]
                           for g in range(groups)]).astype(np.float32)


def _along(v: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if axis is None or v.size == 1:
        return v.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return v.reshape(shape)
