"""User data for analyses (calibration, activation statistics): validation and batching.

Data is a mapping from graph input name to an array whose first axis is the sample axis (the
layout of a calibration .npz). Batches are cut to the batch size of the model's input specs, so
models exported with a fixed batch still run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from graphslim.errors import InputError
from graphslim.frontends.base import TensorSpec

#: optional key of a data mapping: per-sample targets for loss-based criteria (taylor pruning)
LABELS = "labels"


def validate(data: Mapping[str, np.ndarray], specs: list[TensorSpec]) -> int:
    """Check names, shapes and dtypes against the input specs; returns the number of samples."""
    if not isinstance(data, Mapping) or not data:
        raise InputError("data must be a non-empty mapping of input name -> array (samples first)")
    names = [s.name for s in specs]
    if sorted(k for k in data if k != LABELS) != sorted(names):
        raise InputError(f"data has inputs {sorted(data)}, the model's inputs are {names}")
    counts = set()
    for s in specs:
        arr = np.asarray(data[s.name])
        if arr.ndim != len(s.shape) or tuple(arr.shape[1:]) != tuple(s.shape[1:]):
            raise InputError(f"data for input '{s.name}' has shape {list(arr.shape)}; expected "
                             f"[samples, {', '.join(map(str, s.shape[1:]))}]")
        if arr.dtype.kind != s.dtype.kind:
            raise InputError(f"data for input '{s.name}' has dtype {arr.dtype}, the model "
                             f"expects {s.dtype}")
        counts.add(arr.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"data inputs disagree on the number of samples or are empty: {counts}")
    n = counts.pop()
    if LABELS in data and len(np.asarray(data[LABELS])) != n:
        raise InputError(f"data['{LABELS}'] has {len(np.asarray(data[LABELS]))} entries for "
                         f"{n} samples")
    return n


def batches(data: Mapping[str, np.ndarray], specs: list[TensorSpec], size: int | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of `size` samples, by default the specs' batch size (a last partial batch is
    dropped unless it is the only one, in which case the model must accept its size)."""
    n = validate(data, specs)
    if size is None:
        size = max(1, specs[0].shape[0]) if specs and specs[0].shape else 1
    stops = list(range(size, n + 1, size)) or [n]
    start = 0
    for stop in stops:
        yield {s.name: np.ascontiguousarray(np.asarray(data[s.name])[start:stop]).astype(
            s.dtype, copy=False) for s in specs}
        start = stop
