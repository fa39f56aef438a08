"""Calibration: activation statistics for quantization, gathered by running the graph on the
user's data batch by batch (streaming: one batch of activations in memory at a time).

Per float activation value: exact running min / max, and a histogram over [-R, R] with a fixed
number of bins whose half-width R doubles when a batch exceeds it (pairs of bins merge, so the
histogram stays exact at its resolution; ORT's HistogramCollector re-bins approximately). Ranges
for a quantization grid are derived from it by `calibrate_range` with one of METHODS:

- `minmax`: [min, max] seen.
- `percentile`: the (1-p)/2 and 1-(1-p)/2 quantiles (p = 0.9999 by default).
- `mse`: the range, shrunk about zero from [min, max] (121 steps down to 1%), minimizing the
  expected squared error of rounding + clipping under the histogram (rounding inside the grid
  counted as step^2/12).
- `entropy`: the same candidates, minimizing KL(P || Q) of the clipped histogram P against its
  quantized version Q (TensorRT's calibrator, on the two-sided grid).

Written by hand, not ORT's calibrators, because those add every tensor as a model output and hold
all batches' outputs until `compute_data` (FIELD-NOTES: memory blow-ups), and its entropy
calibrator returned the minmax ranges here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from graphslim import data as data_mod
from graphslim.analyses import Analysis, AnalysisManager
from graphslim.errors import InputError
from graphslim.ir import OpKind

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "mse", "entropy")
BINS = 8192  # over [-R, R]; a multiple of 4
#: op kinds whose outputs are never float activations worth a range (shape arithmetic)
_NOT_ACTIVATIONS = frozenset({OpKind.SHAPE, OpKind.GATHER, OpKind.CONSTANT})


@dataclass
class Histogram:
    """Counts of values in BINS equal bins over [-half, half], plus the exact min / max."""

    half: float
    counts: np.ndarray
    lo: float
    hi: float
    nonfinite: int = 0  # inf / NaN entries seen (attention masks): such a value is not quantized

    @classmethod
    def of(cls, x: np.ndarray) -> Histogram:
        h = cls(0.0, np.zeros(BINS, np.int64), np.inf, -np.inf)
        h.add(x)
        return h

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - finite.sum())
            x = x[finite]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        need = max(abs(lo), abs(hi), 1e-12)
        if self.half == 0.0:
            self.half = 2.0 ** np.ceil(np.log2(need))
        while need > self.half:
            self._double()
        idx = ((x + self.half) * (BINS / (2 * self.half))).astype(np.int64)
        np.clip(idx, 0, BINS - 1, out=idx)
        self.counts += np.bincount(idx, minlength=BINS)

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(1)
        quarter = BINS // 4
        self.counts = np.concatenate([np.zeros(quarter, np.int64), merged,
                                      np.zeros(quarter, np.int64)])
        self.half *= 2

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half, self.half, BINS + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


def grid(lo: float, hi: float, qmin: int = 0, qmax: int = 255) -> tuple[float, int]:
    """(scale, zero_point) of an affine grid covering [lo, hi] with zero exactly representable
    (ONNX QuantizeLinear semantics: q = clip(round(x / scale) + zp, qmin, qmax))."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0 or not np.isfinite(scale):
        return 1.0, int(np.clip(0, qmin, qmax))
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zp


def calibrate_range(h: Histogram, method: str, percentile: float = 0.9999,
                    levels: int = 256) -> tuple[float, float]:
    """(lo, hi) to quantize a value with histogram `h` on a `levels`-step grid."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
    if method == "minmax" or hi - lo <= 0:
        return lo, hi
    if method == "percentile":
        cdf = np.cumsum(h.counts) / max(h.counts.sum(), 1)
        tail = (1.0 - percentile) / 2
        e = h.edges
        qlo = e[int(np.searchsorted(cdf, tail, side="left"))]
        qhi = e[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, BINS)]
        return max(lo, min(float(qlo), 0.0)), min(hi, max(float(qhi), 0.0))
    shrink = np.geomspace(0.01, 1.0, 121)
    errors = [_mse(h, lo * a, hi * a, levels) if method == "mse" else
              _kl(h, lo * a, hi * a, levels) for a in shrink]
    a = float(shrink[int(np.argmin(errors))])
    return lo * a, hi * a


def _mse(h: Histogram, lo: float, hi: float, levels: int) -> float:
    scale, zp = grid(lo, hi, 0, levels - 1)
    c, n = h.centers, h.counts
    q = (np.clip(np.round(c / scale) + zp, 0, levels - 1) - zp) * scale
    inside = (c >= lo) & (c <= hi)
    return float(np.sum(n * ((c - q) ** 2 + inside * scale * scale / 12)))


def _kl(h: Histogram, lo: float, hi: float, levels: int) -> float:
    c, n = h.centers, h.counts.astype(np.float64)
    p = n.copy()
    inside = (c >= lo) & (c <= hi)
    first, last = int(np.argmax(inside)), len(inside) - 1 - int(np.argmax(inside[::-1]))
    p[first] += p[:first].sum()
    p[last] += p[last + 1:].sum()
    p[:first] = 0
    p[last + 1:] = 0
    # Q from the counts inside the range only (TensorRT): the clipped mass folded into P's edge
    # bins has no counterpart in Q, so KL charges clipping as well as rounding
    inner = np.where(inside, n, 0.0)
    scale, zp = grid(lo, hi, 0, levels - 1)
    bucket = np.clip(np.round(c / scale) + zp, 0, levels - 1).astype(np.int64)
    nonzero = inner > 0
    mass = np.bincount(bucket, weights=inner, minlength=levels)
    support = np.bincount(bucket, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, mass[bucket] / np.maximum(support[bucket], 1), 0.0)
    ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
    keep = ps > 0
    return float(np.sum(ps[keep] * np.log(ps[keep] / np.maximum(qs[keep], 1e-12))))


@dataclass(frozen=True)
class Calibration:
    """Histograms of every float activation value, and how they were gathered."""

    histograms: dict[str, Histogram]
    samples: int
    synthetic: bool
    peak_batch_bytes: int  # the largest one batch of captured activations held at once


def float_activations(view) -> list[str]:
    """Values a quantization pass may need ranges for: graph inputs and node outputs, minus
    shape arithmetic (ints never reach the histograms: they are filtered when captured)."""
    values = list(view.inputs)
    for n in view.nodes():
        if n.kind not in _NOT_ACTIVATIONS:
            values.extend(v for v in n.outputs if v)
    return list(dict.fromkeys(values))


@functools.cache
def calibration_of(samples: int = 0) -> type[Analysis]:
    """The calibration analysis over the first `samples` samples of the data (0: all); one class
    per sample count so each is cached on its own."""

    class _Calibration(Analysis):
        name = f"calibration[{samples or 'all'}]"

        @classmethod
        def compute(cls, am: AnalysisManager) -> Calibration:
            return _calibrate(am, samples)

    return _Calibration


def _calibrate(am: AnalysisManager, samples: int) -> Calibration:
    from graphslim.analyses.activations import data_or_synthetic

    specs = am.model.input_specs()
    source, synthetic = data_or_synthetic(am, "calibration ranges")
    if samples:
        source = {k: np.asarray(v)[:samples] for k, v in source.items()}
    if not synthetic:
        data_mod.validate(source, specs)
        for k, v in source.items():
            if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all():
                raise InputError(f"calibration data for '{k}' holds inf or NaN")
    values = float_activations(am.view)
    hists: dict[str, Histogram] = {}
    count, peak = 0, 0
    for feeds in data_mod.batches(source, specs):
        acts = am.model.capture(feeds, values)
        peak = max(peak, sum(np.asarray(a).nbytes for a in acts.values()))
        count += len(next(iter(feeds.values())))
        for v, a in acts.items():
            a = np.asarray(a)
            if a.dtype.kind != "f":
                continue
            if v in hists:
                hists[v].add(a)
            else:
                hists[v] = Histogram.of(a)
        del acts
    log.info("calibrated %d values on %d samples%s", len(hists), count,
             " (synthetic)" if synthetic else "")
    return Calibration(hists, count, synthetic, peak)
