"""Judging a compressed model on the user's data (shared/DESIGN.md rule 7).

A `Judge` holds the data a run is judged on and where it came from:

- `eval`: evaluation data the user gave (`optimize(eval_data=)`, `slim-opt --eval-data`, or the
  part of `--calib-data` the CLI holds out): the only source whose numbers predict accuracy;
- `calibration`: the calibration data itself (the Python API given `data=` and no eval data):
  real inputs, but the ones the passes fitted to, so errors read optimistic;
- `inputs`: the user's verification batch (`optimize(inputs=)`);
- `synthetic`: seeded random inputs; they prove structure and say nothing about accuracy (a
  model whose logits move little on noise can lose most of its accuracy on real inputs), and the
  report says so loudly.

The original's outputs on the judge data are computed once; each judged model is run over the
same samples (in the model's batch size) as it will be deployed (ONNX Runtime at opt level all:
int8 models through the integer kernels, which on x86 without VNNI saturate where the QDQ graph
run as written does not: 8-bit weights, demo CNN, cosine 0.9998 as written, 0.955 deployed) and
compared: cosine, relative L2, SQNR and top-1 agreement (where the first output has a class
axis), plus the user's `metric` when given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from graphslim import data as data_mod
from graphslim.errors import InputError
from graphslim.verify import ErrorMetrics, Tolerance, compare

log = logging.getLogger(__name__)

SOURCES = ("eval", "calibration", "inputs", "synthetic")
SYNTHETIC_WARNING = ("fidelity was measured on SYNTHETIC inputs (seeded random data): it proves "
                     "the model runs, not that it keeps its accuracy; give real evaluation data "
                     "(eval_data= / --eval-data)")

#: a user metric: the model's outputs on the judge samples (name -> array, samples first, in
#: the order of the data) -> a number, e.g. accuracy against the user's labels
Metric = Callable[[dict], float]


@dataclass(frozen=True)
class Fidelity:
    """A judged model against the original on the judge data."""

    data: str
    samples: int
    error: ErrorMetrics
    agreement: float | None
    metric: float | None = None

    def as_dict(self) -> dict:
        return {"data": self.data, "samples": self.samples, "cosine": self.error.cosine,
                "rel_l2": self.error.rel_l2, "sqnr_db": self.error.sqnr_db,
                "max_abs": self.error.max_abs, "nonfinite": self.error.nonfinite,
                "agreement": self.agreement, "metric": self.metric}

    def brief(self, metric: bool = True) -> str:
        parts = [f"cosine {self.error.cosine:.4f}", f"rel L2 {self.error.rel_l2:.3g}",
                 f"SQNR {self.error.sqnr_db:.1f} dB"]
        if self.agreement is not None:
            parts.append(f"top-1 agreement {self.agreement:.3f}")
        if metric and self.metric is not None:
            parts.append(f"metric {self.metric:.4g}")
        return ", ".join(parts)


def agreement(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float | None:
    """Share of positions where the first output's argmax over its class axis (axis 1, of size
    > 1, rank >= 2: classifier logits, segmentation maps) is the same; None where it has none."""
    name = next(iter(ref), None)
    if name is None:
        return None
    a, b = np.asarray(ref[name]), np.asarray(got[name])
    if a.ndim < 2 or a.shape[1] < 2 or a.shape != b.shape or a.dtype.kind != "f":
        return None
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


class Judge:
    """The data one run is judged on, and the original's outputs on it."""

    def __init__(self, model, source: str, feeds: list[dict], samples: int,
                 metric: Metric | None = None, tolerance: Tolerance = Tolerance()):
        if source not in SOURCES:
            raise ValueError(f"judge data source must be one of {SOURCES}, not {source!r}")
        self.source = source
        self.feeds = feeds
        self.metric = metric
        self.tolerance = tolerance
        self.samples = samples
        self.last_outputs: dict | None = None  # of the model judged last (judge())
        self.reference = self.outputs(model)
        self.metric_before = self._metric(self.reference)

    @classmethod
    def build(cls, model, *, eval_data=None, data=None, inputs: dict | None = None,
              synthetic: dict | None = None, metric: Metric | None = None,
              tolerance: Tolerance = Tolerance()) -> Judge:
        """Pick the best data there is: eval, else calibration, else the user's inputs, else
        the synthetic batch."""
        specs = model.input_specs()
        if metric is not None and not callable(metric):
            raise InputError(f"metric must be a callable (outputs -> number), not "
                             f"{type(metric).__name__}")
        for source, given in (("eval", eval_data), ("calibration", data)):
            if isinstance(given, Mapping) and given:
                feeds = list(data_mod.batches(given, specs))
                return cls(model, source, feeds, _samples(feeds, given, specs), metric,
                           tolerance)
            if source == "eval" and given is not None:
                raise InputError("eval_data must be a non-empty mapping of input name -> "
                                 "array (samples first)")
        if metric is not None:
            raise InputError("metric= needs real data to be computed on: give eval_data= "
                             "(or data=)")
        feed = inputs if inputs is not None else synthetic
        return cls(model, "inputs" if inputs is not None else "synthetic", [feed],
                   _samples([feed], None, specs), None, tolerance)

    def outputs(self, model) -> dict[str, np.ndarray]:
        """The model's outputs over every judge feed, concatenated along the sample axis."""
        runs = [model.run(f, deployed=True) for f in self.feeds]
        if len(runs) == 1:
            return runs[0]
        return {k: _concat([r[k] for r in runs]) for k in runs[0]}

    def judge(self, model, outputs: dict | None = None) -> Fidelity:
        got = self.outputs(model) if outputs is None else outputs
        self.last_outputs = got
        return Fidelity(self.source, self.samples, compare(self.reference, got, self.tolerance),
                        agreement(self.reference, got), self._metric(got))

    def _metric(self, outputs: dict) -> float | None:
        if self.metric is None:
            return None
        try:
            value = float(self.metric(outputs))
        except Exception as exc:  # the user's code: name it, do not look like a graphslim bug
            raise InputError(f"the metric callable failed: {type(exc).__name__}: {exc}") \
                from None
        return value


def held_out(data: Mapping[str, np.ndarray], specs, fraction: float = 0.2, min_samples: int = 10
             ) -> tuple[dict, dict | None]:
    """Split calibration data into (calibration, evaluation): the last `fraction` of the samples
    (at least one) are held out when there are at least `min_samples`; else (data, None). The
    two parts are disjoint, so the evaluation samples are never fitted to."""
    n = data_mod.validate(data, specs)
    if n < min_samples:
        return dict(data), None
    cut = n - max(1, int(round(n * fraction)))
    kinds = {s.name: data_mod.layout(np.asarray(data[s.name]), s) for s in specs}
    calib, held = {}, {}
    for key, arr in data.items():
        arr = np.asarray(arr)
        if kinds.get(key) == "constant":
            calib[key] = held[key] = arr
        else:
            calib[key], held[key] = arr[:cut], arr[cut:]
    return calib, held


def _samples(feeds: list[dict], given, specs) -> int:
    """Samples the feeds hold: the batch axis of a batched input, else one per feed."""
    for s in specs:
        if not s.shape:
            continue
        if given is None or data_mod.layout(np.asarray(given[s.name]), s) == "batched":
            return sum(int(np.asarray(f[s.name]).shape[0]) for f in feeds)
    return len(feeds)


def _concat(parts: list) -> np.ndarray:
    parts = [np.asarray(p) for p in parts]
    if parts[0].ndim == 0:
        return np.stack(parts)
    return np.concatenate(parts, axis=0)
