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


def layout(arr: np.ndarray, spec: TensorSpec) -> str:
    """How an input's data array holds its samples: 'batched' (samples along the input's first
    axis, the usual (N, C, H, W)), 'stacked' (one whole feed per sample: (N, *shape), for inputs
    without a batch axis such as recurrent state), or 'constant' (a 0-d input given once: the
    same scalar for every sample, e.g. a sample rate). Raises InputError naming the input."""
    shape = tuple(spec.shape)
    if not shape:
        if arr.ndim == 0:
            return "constant"
        if arr.ndim == 1:
            return "stacked"
    elif arr.ndim == len(shape) and tuple(arr.shape[1:]) == shape[1:]:
        return "batched"
    elif arr.ndim == len(shape) + 1 and tuple(arr.shape[1:]) == shape:
        return "stacked"
    want = "a scalar, or [samples]" if not shape else (
        f"[samples, {', '.join(map(str, shape[1:]))}] or [samples, "
        f"{', '.join(map(str, shape))}]")
    raise InputError(f"data for input '{spec.name}' has shape {list(arr.shape)}; expected {want}")


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
        kind = layout(arr, s)
        if arr.dtype.kind != s.dtype.kind:
            raise InputError(f"data for input '{s.name}' has dtype {arr.dtype}, the model "
                             f"expects {s.dtype}")
        if kind != "constant":
            counts.add(arr.shape[0])
    if not counts:
        counts = {1}
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"data inputs disagree on the number of samples or are empty: {counts}")
    n = counts.pop()
    if LABELS in data and len(np.asarray(data[LABELS])) != n:
        raise InputError(f"data['{LABELS}'] has {len(np.asarray(data[LABELS]))} entries for "
                         f"{n} samples")
    return n


def batches(data: Mapping[str, np.ndarray], specs: list[TensorSpec], size: int | None = None,
            keep_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of `size` samples, by default the specs' batch size (a last partial batch is
    dropped unless it is the only one or `keep_last`, in which case the model must accept its
    size). A 'stacked' input feeds the first sample of each batch, a 'constant' one its
    value."""
    n = validate(data, specs)
    kinds = {s.name: layout(np.asarray(data[s.name]), s) for s in specs}
    if size is None:
        batched = [s for s in specs if kinds[s.name] == "batched" and s.shape]
        size = max(1, batched[0].shape[0]) if batched else 1
    if any(k != "batched" for k in kinds.values()):
        size = 1  # one sample per feed where a feed cannot hold several
    stops = list(range(size, n + 1, size)) or [n]
    if keep_last and stops[-1] < n:
        stops.append(n)
    start = 0
    for stop in stops:
        feed = {}
        for s in specs:
            arr = np.asarray(data[s.name])
            kind = kinds[s.name]
            part = arr[start:stop] if kind == "batched" else arr[start] if kind == "stacked" \
                else arr
            feed[s.name] = np.array(part, dtype=s.dtype, order="C")  # keeps 0-d as 0-d
        yield feed
        start = stop


def feed_size(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one feed: the first axis of its first non-scalar array (1 if none)."""
    sizes = [v.shape[0] for v in feed.values() if getattr(v, "ndim", 0) > 0]
    return sizes[0] if sizes else 1


def read_npz(path: str, specs: list[TensorSpec], what: str) -> dict[str, np.ndarray]:
    """A data .npz (one array per input name, samples first, optionally `labels`), checked
    against the input specs; InputError naming the file when it cannot be read."""
    try:
        with np.load(path) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} data '{path}': {exc}") from None
    validate(data, specs)
    return data
