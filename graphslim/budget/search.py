"""Search to a budget: "half the latency on this machine, at most 2 points lost".

1. Sensitivity (graphslim/budget/sensitivity.py): every prunable channel group alone at each
   level, its output error measured on the calibration data (the evaluation data where no
   calibration data is given), with its MACs, size and (for a latency target) its latency
   measured against the original.
2. Candidates: for a sweep of goals around the target, the per-group ratios of least total
   output error (squared rel L2 against the original: continuous where
   a metric on a few samples moves in steps, and additive) whose predicted saving meets the
   goal (graphslim/budget/allocate.py; savings are not additive, hence the sweep), each
   with every recovery option asked for (`reconstruct`: a least-squares refit against the
   original on calibration data) and optionally int8
   (`qdq{choose=latency}`: int8 only where it is faster here); plus uniform ratios as a
   reference. Every candidate is a pipeline text, run as a trial on the workers, measured.
3. The Pareto front of (measured cost, metric); the chosen pipeline is the best metric among
   those meeting the target and the drop, ties to the cheaper.

Why hand-written rather than Optuna: the space is structured (one curve per group, a few
discrete pipeline choices) and a budgeted greedy over measured curves finds in one batch of
trials what a black-box sampler finds in many; the batch also runs in parallel with no
sampler state, so 1 worker and a Ray cluster try the same candidates and, on MACs or size
targets (deterministic), choose the same pipeline. Latency targets choose on measurements:
the chosen pipeline records the ratios, so it reproduces anywhere, but a search run twice
may differ by timing noise.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field

from graphslim.budget.allocate import greedy, monotone, with_midpoints
from graphslim.budget.sensitivity import LEVELS, as_npz, sensitivity
from graphslim.budget.trials import Task, run_trial
from graphslim.budget.workers import map_tasks

TARGETS = {"latency": "latency", "macs": "macs", "size": "bytes"}
_SWEEP = (0.1, 0.05, 0.0, -0.05, -0.1, -0.15, -0.2)  # goal offsets around the target


@dataclass
class SearchResult:
    target: dict
    max_drop: float
    metric: str
    value_before: float
    trials: list = field(default_factory=list)  # every candidate, measured
    front: list = field(default_factory=list)  # the Pareto-optimal ones, cheapest first
    chosen: dict | None = None
    sensitivity: dict | None = None

    def as_dict(self) -> dict:
        return {"target": self.target, "max_drop": self.max_drop, "metric": self.metric,
                "value_before": self.value_before,
                "chosen": self.chosen["decided"] if self.chosen else None,
                "chosen_trial": self.chosen, "front": self.front, "trials": self.trials,
                "sensitivity": self.sensitivity}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1, default=str)

    def table(self) -> str:
        from graphslim.report import format_rows

        kind, _ = _target(self.target)
        rows = [("", kind, "MACs", "size", self.metric, "drop", "pipeline")]
        for t in sorted(self.trials, key=lambda t: t[TARGETS[kind]]):
            mark = "*" if t is self.chosen else ("front" if t in self.front else "")
            rows.append((mark, f"{t[TARGETS[kind]]:.3f}", f"{t['macs']:.3f}",
                         f"{t['bytes']:.3f}", f"{t['value']:.4f}", f"{t['drop']:+.4f}",
                         _brief(t["pipeline"])))
        return format_rows(rows)

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kind, goal = _target(self.target)
        key = TARGETS[kind]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.scatter([t[key] for t in self.trials], [t["value"] for t in self.trials], s=14,
                   c="0.6", label="candidates")
        front = sorted(self.front, key=lambda t: t[key])
        ax.plot([t[key] for t in front], [t["value"] for t in front], "o-", c="C0",
                label="Pareto front")
        if self.chosen:
            ax.scatter([self.chosen[key]], [self.chosen["value"]], s=80, c="C3", marker="*",
                       label="chosen", zorder=3)
        ax.axvline(goal, ls="--", c="C1", lw=1, label=f"target {kind} {goal:g}")
        ax.axhline(self.value_before - self.max_drop, ls=":", c="C2", lw=1,
                   label=f"max drop {self.max_drop:g}")
        ax.set_xlabel(f"{kind} (fraction of the original, measured)")
        ax.set_ylabel(f"{self.metric} on evaluation data")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def compress(model: str, eval_data, calib_data=None, *, target: dict | None, max_drop: float = 0.01,
             metric="agreement", workers=1, prefix: str = "fold-bn", levels=LEVELS,
             recover=("", "reconstruct"), int8: bool = False, threads: int = 1,
             cache: str | None = None, pipeline: str | None = None,
             input_shapes: dict | None = None) -> SearchResult:
    """Search pipelines for an ONNX file to meet `target` ({"latency": F} | {"macs": F} |
    {"size": F}, fractions of the original) losing at most `max_drop` of `metric` on the
    evaluation data. `pipeline`: judge that one pipeline instead of searching (a recipe's
    fixed pipeline). Returns every candidate measured, the front, and the chosen one."""
    if target is None and pipeline is not None:
        target = {"macs": 0.999999}  # a fixed pipeline judged on its drop alone
    kind, goal = _target(target)
    key = TARGETS[kind]
    recover = tuple(r for r in recover if r != "reconstruct" or calib_data is not None)
    with tempfile.TemporaryDirectory(prefix="graphslim_search_") as tmp:
        evalp, calibp = as_npz(eval_data, tmp, "eval"), as_npz(calib_data, tmp, "calib")
        shapes = tuple(sorted((input_shapes or {}).items()))
        sens = None
        if pipeline is None:
            # curves on the calibration data where there is some (the allocation needs only
            # the output error, no labels), so the evaluation data judges candidates and
            # nothing else is fitted to it
            sens = sensitivity(model, calibp or evalp, calibp, levels=levels,
                               metric="cosine" if calibp else metric, workers=workers,
                               cache=cache, timing=kind == "latency", threads=threads,
                               prefix=prefix, input_shapes=input_shapes)
            texts = candidates(sens, key, goal, prefix, recover, int8, threads)
        else:
            texts = [pipeline]
        tasks = [Task(model, t, evalp, calibp, metric, threads, True, shapes) for t in texts]
        trials = map_tasks(run_trial, tasks, workers)
    good = [t for t in trials if not t["error"]]
    if not good:
        raise ValueError(f"every candidate failed, e.g. {trials[0]['pipeline']}: "
                         f"{trials[0]['error']}")
    value_before = good[0]["value_before"]
    res = SearchResult(dict(target), max_drop, metric if isinstance(metric, str) else
                       "metric", value_before, good, pareto(good, key),
                       sensitivity=sens.as_dict() if sens else None)
    meets = [t for t in good if t[key] <= goal and t["drop"] <= max_drop]
    res.chosen = max(meets, key=lambda t: (t["value"], -t[key])) if meets else None
    return res


def finish(res: SearchResult, model: str, output: str, calib_data=None, input_shapes=None,
           threads: int = 1) -> dict:
    """Build the chosen pipeline on the model, save it to `output`, and time it against the
    input alone (a longer measurement than a trial's, with no other trial running): the
    latency the user gets, as JSON "latency"."""
    import graphslim
    from graphslim.data import read_npz
    from graphslim.runtime import cpu_info, time_models
    from graphslim.verify import make_inputs

    m = graphslim.load(model, input_shapes=input_shapes or None)
    calib = read_npz(calib_data, m.input_specs(), "calibration") if isinstance(
        calib_data, str) else calib_data
    run = graphslim.optimize(m, res.chosen["decided"], data=calib)
    run.model.save(output)
    before, after = time_models(model, output, make_inputs(m.input_specs(), 0),
                                threads=threads or None, max_time=8.0, repeats=400)
    info = cpu_info()
    return {"before_ms": before.median * 1e3, "after_ms": after.median * 1e3,
            "ratio": after.median / before.median, "threads": threads or "all",
            "cpu": info["model"], "isa": info["isa"], "runtime": "onnxruntime-cpu"}


def candidates(sens, key: str, goal: float, prefix: str, recover, int8: bool, threads: int
               ) -> list[str]:
    """Pipeline texts: budgeted allocations over a sweep of goals, each with every recovery
    option (and int8 where asked), plus uniform ratios for reference."""
    table = {}
    for name, pts in sens.curves.get("prune", {}).items():
        pts = [p for p in pts if p[key] is not None]
        if pts:
            table[name] = with_midpoints([p["level"] for p in pts],
                                         monotone([1 - p[key] for p in pts]),
                                         monotone([p["rel_l2"] ** 2 for p in pts]))
    pre = f"{prefix}," if prefix else ""
    prunes = []
    for off in _SWEEP:
        g = goal + off
        if not 0 < g < 1:
            continue
        alloc = greedy(table, 1 - g)
        if alloc:
            ratios = ";".join(f"{_escape(n)}:{r:g}" for n, r in alloc.items())
            prunes.append(f"prune-channels{{ratios={ratios},round-to={sens.round_to}}}")
    prunes += [f"prune-channels{{ratio={r:g},round-to={sens.round_to}}}" for r in sens.levels]
    out = []
    tails = [f",qdq{{choose=latency,threads={threads}}}"] if int8 else []
    for p in dict.fromkeys(prunes):
        for rec in recover:
            for tail in ["", *tails]:
                out.append(pre + p + (f",{rec}" if rec else "") + tail)
    return list(dict.fromkeys(out))


def pareto(trials: list[dict], key: str) -> list[dict]:
    """Trials no other is at least as cheap and at least as good as (and better in one)."""
    front = []
    for t in trials:
        if not any(o is not t and o[key] <= t[key] and o["value"] >= t["value"] and
                   (o[key] < t[key] or o["value"] > t["value"]) for o in trials):
            front.append(t)
    return sorted(front, key=lambda t: t[key])


def _target(target: dict) -> tuple[str, float]:
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError("target must be one of latency=F, macs=F, size=F")
    (kind, goal), = target.items()
    if kind not in TARGETS or not 0 < float(goal) < 1:
        raise ValueError(f"target must be one of {', '.join(TARGETS)} with a fraction in "
                         f"(0, 1), not {kind}={goal}")
    return kind, float(goal)


def parse_target(text: str) -> dict:
    """`latency=0.5` -> {"latency": 0.5}."""
    kind, _, value = text.partition("=")
    try:
        t = {kind.strip(): float(value)}
    except ValueError:
        raise ValueError(f"--target must be latency=F, macs=F or size=F, not '{text}'") from None
    _target(t)
    return t


def _escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _brief(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
