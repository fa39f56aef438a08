"""One trial: a pipeline text run on a model file, judged on evaluation data, timed against
the original in the same process. The unit every sensitivity point and search candidate is
made of, so it takes only things that pickle (paths, text, numbers) and returns a plain dict.

Metrics (`metric`): `agreement` (top-1 agreement of the first output with the original's:
classifiers, no labels needed), `cosine` (of all outputs: embeddings, regressors), `accuracy`
(top-1 against `labels` stored in the evaluation .npz), or a picklable callable taking the
model's outputs on the evaluation samples (name -> array) and returning a number. Higher is
better for all of them; a trial's `drop` is the original's value minus the trial's.

A trial that fails (a target a pass cannot meet, a pipeline that does not parse) comes back
with `error` set instead of raising: a search goes on without it, and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from graphslim.errors import GraphslimError, InputError

METRICS = ("agreement", "cosine", "accuracy")


@dataclass(frozen=True)
class Task:
    model: str  # an ONNX file
    pipeline: str | None  # None: the original itself (its metric and size)
    eval_data: str  # .npz: one array per input name, samples first (+ `labels` for accuracy)
    calib_data: str | None = None
    metric: str | Callable = "agreement"
    threads: int = 1  # ORT intra-op threads latency is measured at (0: all cores)
    timing: bool = True
    input_shapes: tuple = field(default=())  # ((name, (dims...)), ...) for dynamic inputs

    def key(self) -> str:
        """A cache key: the task with the contents (not the names) of its files."""
        d = asdict(self)
        for k in ("model", "eval_data", "calib_data"):
            d[k] = _file_hash(d[k]) if d[k] else None
        d["metric"] = self.metric if isinstance(self.metric, str) else \
            f"{getattr(self.metric, '__module__', '')}.{getattr(self.metric, '__qualname__', '')}"
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def run_trial(task: Task) -> dict:
    """{"pipeline", "decided", "value", "value_before", "drop", "cosine", "rel_l2", "agreement",
    "macs",
    "params", "bytes" (fractions of the original), "latency" (fraction, None untimed),
    "ms_before", "ms_after", "seconds", "error"}."""
    import graphslim
    from graphslim.data import read_npz

    t0 = time.perf_counter()
    out = {"pipeline": task.pipeline, "decided": task.pipeline, "error": None}
    try:
        model = graphslim.load(task.model, input_shapes=dict(task.input_shapes) or None)
        specs = model.input_specs()
        evald = read_npz(task.eval_data, specs, "evaluation")
        calib = read_npz(task.calib_data, specs, "calibration") if task.calib_data else None
        metric = metric_fn(task.metric, evald)
        judged = {k: v for k, v in evald.items() if k != "labels"}
        res = graphslim.optimize(model, task.pipeline or "fold-bn", data=calib,
                                 eval_data=judged, metric=metric, verify="end")
        rep = res.report
        fid = rep.fidelity
        before = rep.metric_before if rep.metric_before is not None else 1.0
        value = _value(task.metric, fid)
        o, f = rep.original, rep.final
        out.update(decided=rep.decided if task.pipeline else None, value=value,
                   value_before=before, drop=before - value, cosine=fid.error.cosine,
                   rel_l2=fid.error.rel_l2,
                   agreement=fid.agreement, macs=f.macs / max(o.macs, 1),
                   params=f.params / max(o.params, 1), bytes=f.bytes / max(o.bytes, 1))
        out.update(_timing(task, model, res.model) if task.timing else
                   {"latency": None, "ms_before": None, "ms_after": None})
        if task.pipeline is None:
            out.update(value=before, drop=0.0, rel_l2=0.0)
    except (GraphslimError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def metric_fn(metric, evald: dict) -> Callable | None:
    """The callable optimize() reports for `metric` (None where the fidelity has it)."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)} or a callable, not "
                         f"'{metric}'")
    if metric != "accuracy":
        return None
    if "labels" not in evald:
        raise InputError("metric=accuracy needs a 'labels' array in the evaluation .npz")
    return _Accuracy(np.asarray(evald["labels"]))


@dataclass(frozen=True)
class _Accuracy:
    labels: np.ndarray

    def __call__(self, outputs: dict) -> float:
        first = np.asarray(next(iter(outputs.values())))
        return float(np.mean(first.argmax(axis=1) == self.labels))


def _value(metric, fid) -> float:
    if metric == "agreement":
        if fid.agreement is None:
            raise InputError("metric=agreement needs a first output with a class axis; use "
                             "metric=cosine")
        return float(fid.agreement)
    if metric == "cosine":
        return float(fid.error.cosine)
    return float(fid.metric)


def _timing(task: Task, original, result) -> dict:
    from graphslim.runtime import time_models
    from graphslim.verify import make_inputs

    feeds = make_inputs(original.input_specs(), 0)
    threads = task.threads or None
    before, after = time_models(task.model, result.deployable(), feeds, threads=threads,
                                max_time=3.0)
    return {"latency": after.median / before.median, "ms_before": before.median * 1e3,
            "ms_after": after.median * 1e3}


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(fn: Callable[[list], list], tasks: list[Task], cache_dir: str | None) -> list[dict]:
    """fn(tasks) with results kept in `cache_dir` (one JSON per task key): points already
    measured are not run again. Untimed results only: a latency is of its machine and moment."""
    if not cache_dir:
        return fn(tasks)
    os.makedirs(cache_dir, exist_ok=True)
    keys = [t.key() for t in tasks]
    found: dict[int, dict] = {}
    for i, k in enumerate(keys):
        path = os.path.join(cache_dir, f"{k}.json")
        if not tasks[i].timing and os.path.exists(path):
            with open(path) as f:
                found[i] = json.load(f)
    todo = [i for i in range(len(tasks)) if i not in found]
    for i, r in zip(todo, fn([tasks[i] for i in todo])):
        found[i] = r
        if not tasks[i].timing and r.get("error") is None:
            with open(os.path.join(cache_dir, f"{keys[i]}.json"), "w") as f:
                json.dump(r, f)
    return [found[i] for i in range(len(tasks))]
