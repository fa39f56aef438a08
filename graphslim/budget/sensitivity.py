"""Sensitivity analysis: how the user's metric on evaluation data moves as one thing changes.

- `prune`: each prunable channel group alone at each level (`prune-channels{ratios=G:r}`), so
  residual-coupled layers are measured as the group they are pruned in (per-layer analysis
  would report no change for them: a known pitfall of per-layer tools);
- `factorize`: each conv / linear alone at rank fraction 1 - level (`factorize{only=L,rank=..}`;
  a layer the rank would not make cheaper stays as it is and reads as no change);
- `qdq`: every quantizable layer int8, and each one kept float in turn (`qdq{exclude=L}`): what
  keeping that layer float buys back (needs calibration data).

Each point is a trial (graphslim/budget/trials.py) run on the workers asked for and cached by
content (`cache`). The prune channel block (`round-to`) is fixed here once and written into
every trial's text, so workers on other machines prune the same channels.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from graphslim.budget.trials import Task, cached, run_trial
from graphslim.budget.workers import map_tasks
from graphslim.ir import OpKind

KINDS = ("prune", "factorize", "qdq")
LEVELS = (0.25, 0.5, 0.75)
_LAYERS = (OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL)


@dataclass
class Sensitivity:
    """curves[kind][target] = [{"level", "value", "drop", "rel_l2", "macs", "bytes",
    "latency", "pipeline"}]: the metric, its drop from the original, the output error (rel L2
    against the original on the evaluation data), and cost fractions of the original."""

    metric: str
    value_before: float
    round_to: int
    levels: tuple
    curves: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)  # prune group -> channels
    failed: list = field(default_factory=list)  # (pipeline, error)

    def as_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1)

    def table(self, kind: str = "prune") -> str:
        from graphslim.report import format_rows

        levels = (1.0,) if kind == "qdq" else self.levels
        head = ("drop (int8; * all, else this one float)",) if kind == "qdq" else tuple(
            f"drop@{lv:g}" for lv in levels)
        rows = [(kind, *head, "MACs@max")]
        for target, pts in self.curves.get(kind, {}).items():
            by = {p["level"]: p for p in pts}
            rows.append((_short(target), *(f"{by[lv]['drop']:+.4f}" if lv in by else "-"
                                           for lv in levels),
                         f"{pts[-1]['macs']:.3f}" if pts else "-"))
        return format_rows(rows)

    def plot(self, path: str, kind: str = "prune") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for target, pts in self.curves.get(kind, {}).items():
            ax.plot([0, *(p["level"] for p in pts)], [0, *(p["drop"] for p in pts)],
                    marker="o", lw=1, label=_short(target))
        ax.set_xlabel("ratio removed" if kind == "prune" else "level")
        ax.set_ylabel(f"{self.metric} drop (evaluation data)")
        ax.set_title(f"{kind} sensitivity, {self.metric} before {self.value_before:.4f}")
        if len(self.curves.get(kind, {})) <= 16:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def sensitivity(model: str, eval_data, calib_data=None, *, kinds=("prune",), levels=LEVELS,
                metric="agreement", workers=1, cache: str | None = None, timing=False,
                threads: int = 1, prefix: str = "fold-bn", round_to: int = 0,
                input_shapes: dict | None = None) -> Sensitivity:
    """Sensitivity curves of an ONNX file on evaluation data (a .npz path or a mapping input
    name -> array; `labels` for metric=accuracy). `prefix`: passes run before each point,
    fold-bn by default as in compress(): l1 scores a conv's weights without the BatchNorm after
    it, folded they include its scale (the digits CNN, trained with an L1 penalty on BN scales:
    /0/Conv at ratio 0.5 keeps 0.10 top-1 agreement unfolded, 1.00 folded). `timing`: also
    measure each point's latency against the original."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds must be among {', '.join(KINDS)}, not {bad}")
    with tempfile.TemporaryDirectory(prefix="graphslim_sens_") as tmp:
        evalp, calibp = as_npz(eval_data, tmp, "eval"), as_npz(calib_data, tmp, "calib")
        if "qdq" in kinds and calibp is None:
            raise ValueError("qdq sensitivity needs calibration data")
        shapes = tuple(sorted((input_shapes or {}).items()))
        round_to = round_to or _channel_block()
        points, units = _points(model, kinds, levels, prefix, round_to, shapes)

        def task(text):
            return Task(model, text, evalp, calibp, metric, threads, timing, shapes)

        base, *results = cached(lambda ts: map_tasks(run_trial, ts, workers),
                                [task(None), *(task(p[3]) for p in points)], cache)
    if base["error"]:
        raise ValueError(f"the original could not be judged: {base['error']}")
    out = Sensitivity(metric, base["value"], round_to, tuple(levels), units=units)
    for (kind, target, level, text), r in zip(points, results):
        if r["error"]:
            out.failed.append((text, r["error"]))
            continue
        out.curves.setdefault(kind, {}).setdefault(target, []).append(
            {"level": level, "value": r["value"], "drop": r["value_before"] - r["value"],
             "rel_l2": r["rel_l2"], "macs": r["macs"], "bytes": r["bytes"],
             "latency": r["latency"],
             "pipeline": text})
    return out


def as_npz(data, tmp: str, name: str) -> str | None:
    """A data path as given, or a mapping written to `tmp` (workers read files)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else os.fspath(data)
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} data must be a .npz path or a mapping of input name -> array")
    path = os.path.join(tmp, f"{name}.npz")
    np.savez(path, **{k: np.asarray(v) for k, v in data.items()})
    return path


def prune_groups(model) -> dict[str, int]:
    """The prunable channel groups of a model (named by the first node creating their
    channels) -> their size in units."""
    from graphslim.analyses import AnalysisManager
    from graphslim.analyses.channels import ChannelDepsAnalysis

    deps = AnalysisManager(model).get(ChannelDepsAnalysis)
    return {g.spaces[0]: g.size for g in deps.prunable}


def _points(path, kinds, levels, prefix, round_to, shapes) -> tuple[list, dict]:
    import graphslim

    model = graphslim.load(path, input_shapes=dict(shapes) or None)
    pre = f"{prefix}," if prefix else ""
    points, units = [], {}
    if "prune" in kinds:
        units = prune_groups(model)
        for name in units:
            for lv in levels:
                points.append(("prune", name, lv, f"{pre}prune-channels{{ratios="
                               f"{glob.escape(name)}:{lv:g},round-to={round_to}}}"))
    layers = [n.name for n in model.view().nodes() if n.kind in _LAYERS]
    if "factorize" in kinds:
        for name in layers:
            for lv in levels:
                points.append(("factorize", name, lv, f"{pre}factorize{{only="
                               f"{glob.escape(name)},rank={1 - lv:g}}}"))
    if "qdq" in kinds:
        points.append(("qdq", "*", 1.0, f"{pre}qdq"))
        for name in layers:
            points.append(("qdq", name, 1.0, f"{pre}qdq{{exclude={glob.escape(name)}}}"))
    return points, units


def _channel_block() -> int:
    from graphslim.runtime import cpu_channel_block

    return cpu_channel_block()


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
