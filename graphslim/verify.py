"""Seeded inputs, numerical comparison and error metrics used after every pass.

Tolerances are always explicit: lossless passes are held to `Tolerance()` (fp32: rtol 1e-4,
atol 1e-5, in the numpy.allclose sense |got - ref| <= atol * scale + rtol * |ref|); lossy passes
report relative L2 error, cosine similarity and SQNR and fail only above a user-set limit.

`scale` is max(1, max |ref|) of each output: float32 rounding error grows with the magnitude of
what is summed, so a deep network whose logits reach 60 differs by ~3e-5 near its zero crossings
after any exact rewrite (resnet50 here); for outputs within [-1, 1] this is plain allclose.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from graphslim.errors import InputError
from graphslim.frontends.base import TensorSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-5
    scale_atol: bool = True  # atol in units of max(1, max |ref|) per output

    def __str__(self) -> str:
        return f"rtol {self.rtol:g}, atol {self.atol:g}" + (
            " x max(1, max|ref|)" if self.scale_atol else "")


@dataclass(frozen=True)
class ErrorMetrics:
    """Error of `got` against `ref`, worst over all outputs."""

    max_abs: float
    max_excess: float  # max of |got - ref| - (atol*scale + rtol|ref|): > 0 = not close
    rel_l2: float
    cosine: float
    sqnr_db: float
    #: elements finite in `ref` but NaN / Inf in `got` (or the reverse): always a failure
    nonfinite: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(specs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Reproducible inputs: standard normal floats, small non-negative ints, random bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        if s.dtype.kind == "f":
            value = rng.standard_normal(s.shape)
        elif s.dtype.kind in "iu":
            value = rng.integers(0, 8, size=s.shape)
        elif s.dtype.kind == "b":
            value = rng.random(s.shape) > 0.5
        else:
            raise InputError(f"input '{s.name}': cannot make test data of dtype {s.dtype}")
        feeds[s.name] = np.asarray(value, dtype=s.dtype)  # 0-d inputs stay arrays for ORT
    log.debug("verification inputs: %s (seed %d)",
              ", ".join(f"{s.name}{list(s.shape)}" for s in specs), seed)
    return feeds


def _pairs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]):
    if list(ref) != list(got):
        raise ValueError(f"output names changed: {list(ref)} -> {list(got)}")
    for name in ref:
        a, b = np.asarray(ref[name]), np.asarray(got[name])
        if a.shape != b.shape:
            raise ValueError(f"output '{name}' changed shape: {a.shape} -> {b.shape}")
        if a.dtype != b.dtype:
            raise ValueError(f"output '{name}' changed dtype: {a.dtype} -> {b.dtype}")
        yield name, a.astype(np.float64), b.astype(np.float64)


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
            tol: Tolerance = Tolerance()) -> ErrorMetrics:
    """Metrics of `got` against `ref`; `max_excess` > 0 means allclose(got, ref, tol) fails.

    Elements where `ref` and `got` disagree on being finite (a NaN or Inf appeared, or went
    away) are counted in `nonfinite` and make `is_close` false; the other metrics are taken over
    the elements finite in both (NaN would otherwise compare as 'no difference' in max())."""
    max_abs = excess = 0.0
    err2 = ref2 = dot = got2 = 0.0
    nonfinite = 0
    for _, a, b in _pairs(ref, got):
        fa, fb = np.isfinite(a), np.isfinite(b)
        same_special = ~fa & ~fb & ((np.isnan(a) & np.isnan(b)) | (a == b))
        nonfinite += int(np.count_nonzero((fa != fb) | (~fa & ~fb & ~same_special)))
        both = fa & fb
        a, b = a[both], b[both]
        d = np.abs(b - a)
        if d.size:
            scale = max(1.0, float(np.abs(a).max())) if tol.scale_atol else 1.0
            max_abs = max(max_abs, float(d.max()))
            excess = max(excess, float((d - (tol.atol * scale + tol.rtol * np.abs(a))).max()))
        err2 += float(np.sum((b - a) ** 2))
        ref2 += float(np.sum(a * a))
        got2 += float(np.sum(b * b))
        dot += float(np.sum(a * b))
    if nonfinite:
        return ErrorMetrics(float("inf"), float("inf"), float("inf"), 0.0, float("-inf"),
                            nonfinite)
    rel_l2 = np.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else float("inf"))
    cosine = dot / np.sqrt(ref2 * got2) if ref2 > 0 and got2 > 0 else float(err2 == 0)
    sqnr = 10 * np.log10(ref2 / err2) if err2 > 0 else float("inf")
    return ErrorMetrics(max_abs, excess, float(rel_l2), float(cosine), float(sqnr))


def is_close(metrics: ErrorMetrics) -> bool:
    return metrics.nonfinite == 0 and metrics.max_excess <= 0.0
