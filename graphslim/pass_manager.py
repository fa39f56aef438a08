"""Pass, Plan, the pass registry and the PassManager.

A pass reads a read-only GraphView and returns a Plan (edits + skipped nodes with reasons + stats);
the manager applies the plan through the model's frontend, drops analyses the pass does not
preserve, verifies, and records what happened. The caller's model is copied once up front unless
`inplace=True`. Every listed pass runs; there are no optimization levels.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from graphslim.analyses import AnalysisManager
from graphslim.analyses.cost import Cost
from graphslim.errors import (
    GraphslimError,
    InputError,
    PassError,
    PipelineError,
    StructureError,
    VerificationError,
)
from graphslim.fidelity import SYNTHETIC_WARNING, Judge
from graphslim.frontends.base import Frontend
from graphslim.pass_base import (  # noqa: F401  (Pass, Plan, ... re-exported for passes)
    Pass,
    Plan,
    Repeat,
    Skip,
    flatten,
    ordering_error,
    register_pass,
    registered_passes,
)
from graphslim.pipeline_text import parse_pipeline, print_pipeline
from graphslim.provenance import Provenance
from graphslim.report import PassRecord, Report, Snapshot
from graphslim.verify import ErrorMetrics, Tolerance, compare, is_close, make_inputs

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    model: Frontend
    report: Report
    analyses: AnalysisManager


class PassManager:
    """Runs a pipeline. verify: 'each' (default), 'end' or 'off'. `max_error` bounds the relative
    L2 error of lossy passes against the original (None: report only)."""

    def __init__(self, pipeline, verify: str = "each", tolerance: Tolerance = Tolerance(),
                 max_error: float | None = None, seed: int = 0, instruments=(),
                 inplace: bool = False):
        if isinstance(pipeline, str):
            pipeline = parse_pipeline(pipeline)
        elif isinstance(pipeline, (Pass, Repeat)):
            pipeline = [pipeline]
        if not isinstance(pipeline, (list, tuple)) or not pipeline or \
                not all(isinstance(p, (Pass, Repeat)) for p in pipeline):
            raise InputError(f"a pipeline is text such as 'fold-bn,qdq' or a list of passes, "
                             f"not {type(pipeline).__name__} {pipeline!r:.60}")
        problem = ordering_error(pipeline)
        if problem:
            raise PipelineError(problem)
        if verify not in ("each", "end", "off"):
            raise InputError(f"verify must be 'each', 'end' or 'off', not {verify!r}")
        if max_error is not None and not (isinstance(max_error, (int, float)) and
                                          math.isfinite(max_error) and max_error >= 0):
            raise InputError(f"max_error must be a finite number >= 0 (a relative L2 error), "
                             f"not {max_error!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise InputError(f"seed must be an integer >= 0, not {seed!r}")
        self.pipeline = list(pipeline)
        self.verify = verify
        self.tolerance = tolerance
        self.max_error = max_error
        self.seed = seed
        self.instruments = list(instruments)
        self.inplace = inplace
        self._keeps_reference = any(getattr(p, "needs_reference", False)
                                    for p in flatten(self.pipeline))

    @property
    def text(self) -> str:
        return print_pipeline(self.pipeline)

    def run(self, model: Frontend, data: Any = None, inputs: dict | None = None,
            dry_run: bool = False, eval_data: Any = None, metric=None) -> RunResult:
        """`data`: calibration / importance data for the passes; `eval_data`: held-out data
        the run is judged on (fidelity of every lossy pass and of the result against the
        original, `max_error`); `metric`: the user's own measure, called with the model's
        outputs on the judge data (graphslim/fidelity.py says which data is used when)."""
        if not isinstance(model, Frontend):
            hint = " (call graphslim.load(path) first)" if isinstance(model, str) else ""
            raise InputError(f"optimize takes a model from graphslim.load or graphslim.trace, "
                             f"not {type(model).__name__}{hint}")
        work = model if self.inplace else model.copy()
        am = AnalysisManager(work, data)
        feeds = _check_feeds(inputs, work.input_specs()) if inputs is not None else \
            make_inputs(work.input_specs(), self.seed)
        try:
            work.check()
        except StructureError as exc:
            raise InputError(f"the input model fails its structural check: {exc}") from None
        state = _State(work, am, feeds, _run_original(work, feeds, inputs is not None)
                       if self.verify != "off" else None)
        report = Report(self.text, work.name, _snapshot(work, am),
                        notes=list(work.load_notes))
        if self.verify != "off":
            state.judge = _judge(work, eval_data, data, inputs, feeds, metric, self.tolerance)
            report.metric_before = state.judge.metric_before
            if state.judge.source == "synthetic":
                log.warning(SYNTHETIC_WARNING)
                report.notes.append(SYNTHETIC_WARNING)
            elif state.judge.source == "calibration":
                report.notes.append("fidelity measured on the calibration data itself (no "
                                    "eval_data): real inputs, but the ones passes fitted to")
        t0 = time.perf_counter()
        for p in self.pipeline:
            self._run_item(p, state, report, dry_run)
        if self.verify == "end" and state.ran:
            self._verify_end(state, report)
        elif self.verify == "off" and state.ran and not dry_run:
            self._check_structure(state, report)
        if state.judge is not None:
            report.fidelity = state.fidelity or state.judge.judge(work)
        report.seconds = time.perf_counter() - t0
        report.final = _snapshot(work, am)
        report.decided = print_pipeline(_decided(self.pipeline, state.decided))
        return RunResult(work, report, am)

    def _run_item(self, item, state: _State, report: Report, dry_run: bool) -> int:
        if isinstance(item, Repeat):
            total = 0
            for _ in range(item.max_iter):
                changed = sum(self._run_item(p, state, report, dry_run) for p in item.passes)
                total += changed
                if not changed:
                    break
            return total
        record = self._run_pass(item, state, dry_run)
        if record.decided:
            state.decided.setdefault(id(item), {}).update(record.decided)
        report.records.append(record)
        state.ran.append(item.name)
        return record.nodes_changed  # a fixed point is a round that changed nothing

    def _run_pass(self, p: Pass, state: _State, dry_run: bool) -> PassRecord:
        for inst in self.instruments:
            getattr(inst, "before_pass", lambda *a: None)(p, state.model)
        t0 = time.perf_counter()
        before = tuple(state.ran)
        try:
            converted = state.model.require_opset(p.min_opset) if p.min_opset else None
            if converted:
                state.am.invalidate(())
            if self._keeps_reference and state.am.provenance is None and (
                    not p.lossless or p.needs_reference):
                state.am.provenance = Provenance(state.model.copy())
            view = state.model.view()
            plan = p.plan(view, state.am)
            if state.am.provenance is not None and not dry_run:
                state.am.provenance.record(view, plan.edits)
            changed = 0 if dry_run else state.model.apply(plan.edits)
            if state.am.provenance is not None and not dry_run:
                state.am.provenance.applied(view, state.model.view(), plan.edits)
        except GraphslimError:
            raise
        except Exception as exc:
            raise PassError(p.name, f"{type(exc).__name__}: {exc}", getattr(exc, "node", None),
                            before) from exc
        if changed:
            state.am.invalidate(p.preserves)
        seconds = time.perf_counter() - t0
        record = PassRecord(str(p), p.name, p.lossless, seconds, len(plan.edits), changed,
                            list(plan.skipped), dict(plan.stats), list(plan.notes),
                            details=list(plan.details), decided=dict(plan.decided))
        if converted:
            record.notes.insert(0, converted)
            record.nodes_changed = max(record.nodes_changed, 1)  # verified like any change
            changed = changed or 1
        if changed and self.verify == "each":
            self._verify(p, state, record)
        record.after = _snapshot(state.model, state.am)
        for inst in self.instruments:
            getattr(inst, "after_pass", lambda *a: None)(p, state.model, record)
        return record

    def _verify(self, p: Pass, state: _State, record: PassRecord) -> None:
        try:
            state.model.check()
            outputs = state.model.run(state.feeds)
            vs_prev = compare(state.prev, outputs, self.tolerance)
            vs_orig = compare(state.original, outputs, self.tolerance)
        except StructureError as exc:
            raise VerificationError(p.name, "structure", str(exc), "must pass") from None
        except ValueError as exc:
            raise VerificationError(p.name, "outputs", str(exc), "unchanged names/shapes") \
                from None
        record.error_prev, record.error_orig = vs_prev, vs_orig
        record.verified = "numerical" if p.lossless else "reported"
        _check_finite(p.name, vs_prev)
        if p.lossless and not is_close(vs_prev):
            raise VerificationError(p.name, "max |after - before|", f"{vs_prev.max_abs:.3g}",
                                    str(self.tolerance), "a lossless pass changed the outputs")
        state.prev = outputs
        state.fidelity = None
        if not p.lossless or state.judge.metric is not None:
            # lossy passes are judged on the judge data (eval data where given), as is every
            # pass when the user's metric is to be reported per pass
            state.fidelity = record.fidelity = state.judge.judge(state.model)
            record.error_orig = vs_orig = state.fidelity.error
            _check_finite(p.name, vs_orig)
            if not p.lossless:  # the step's own error, on the same data
                record.error_prev = compare(state.judged_prev or state.judge.reference,
                                            state.judge.last_outputs, self.tolerance)
            state.judged_prev = state.judge.last_outputs
        self._check_budget(p.name, vs_orig, state.judge.source)

    def _check_budget(self, name: str, vs_orig: ErrorMetrics, source: str = "") -> None:
        if self.max_error is not None and vs_orig.rel_l2 > self.max_error:
            on = f" (on {source} data)" if source else ""
            raise VerificationError(name, f"relative L2 error vs original{on}",
                                    f"{vs_orig.rel_l2:.3g}", f"{self.max_error:g}")

    def _check_structure(self, state: _State, report: Report) -> None:
        """verify='off' skips the numbers, never the structure: nothing is emitted that fails
        onnx.checker or does not load in ONNX Runtime."""
        name = report.records[-1].name if report.records else "pipeline"
        try:
            state.model.check()
        except StructureError as exc:
            raise VerificationError(name, "structure", str(exc), "must pass") from None

    def _verify_end(self, state: _State, report: Report) -> None:
        name = report.records[-1].name if report.records else "pipeline"
        try:
            state.model.check()
            metrics = compare(state.original, state.model.run(state.feeds), self.tolerance)
        except StructureError as exc:
            raise VerificationError(name, "structure", str(exc), "must pass") from None
        report.end_error = metrics
        _check_finite(name, metrics)
        if all(r.lossless for r in report.records) and not is_close(metrics):
            raise VerificationError(name, "max |final - original|", f"{metrics.max_abs:.3g}",
                                    str(self.tolerance), "lossless pipeline changed the outputs")
        state.fidelity = state.judge.judge(state.model)
        _check_finite(name, state.fidelity.error)
        self._check_budget(name, state.fidelity.error, state.judge.source)


def _check_feeds(inputs, specs) -> dict:
    """The user's verification inputs, checked against the model's inputs by name, rank and
    dtype kind (else ORT's own error would surface mid-pipeline)."""
    import numpy as np

    if not isinstance(inputs, dict):
        raise InputError(f"inputs must be a dict of input name -> array, not "
                         f"{type(inputs).__name__}")
    names = [s.name for s in specs]
    if sorted(inputs) != sorted(names):
        raise InputError(f"inputs has {sorted(inputs)}, the model's inputs are {names}")
    feeds = {}
    for s in specs:
        arr = np.asarray(inputs[s.name])
        if arr.ndim != len(s.shape) or arr.dtype.kind != s.dtype.kind:
            raise InputError(f"inputs['{s.name}'] is {arr.dtype} {list(arr.shape)}; the model "
                             f"takes {s.dtype} of rank {len(s.shape)}, e.g. {list(s.shape)}")
        feeds[s.name] = arr.astype(s.dtype, copy=False)
    return feeds


def _run_original(model: Frontend, feeds: dict, given: bool) -> dict:
    try:
        return model.run(feeds)
    except (StructureError, ValueError, TypeError) as exc:  # e.g. a wrong fixed dim
        what = "the given inputs" if given else "seeded inputs of its input shapes"
        raise InputError(f"the input model does not run on {what}: {exc}") from None


def _decided(pipeline: list, decided: dict) -> list:
    """The pipeline with what each pass resolved on this machine written into its options."""
    import dataclasses

    out = []
    for p in pipeline:
        if isinstance(p, Repeat):
            out.append(Repeat(tuple(_decided(list(p.passes), decided)), p.max_iter))
        else:
            out.append(dataclasses.replace(p, **decided[id(p)]) if id(p) in decided else p)
    return out


def _judge(model, eval_data, data, inputs, feeds, metric, tolerance) -> Judge:
    try:
        return Judge.build(model, eval_data=eval_data, data=data, inputs=inputs,
                           synthetic=feeds, metric=metric, tolerance=tolerance)
    except (StructureError, ValueError, TypeError) as exc:
        raise InputError(f"the input model does not run on the evaluation data: {exc}") \
            from None


def _check_finite(name: str, metrics: ErrorMetrics) -> None:
    """NaN or Inf where the reference is finite fails every pass, lossless or lossy, whatever
    max_error says: no error budget admits a model that returns NaN."""
    if metrics.nonfinite:
        raise VerificationError(name, "non-finite outputs", f"{metrics.nonfinite} elements",
                                "0", "NaN or Inf where the model before was finite")


@dataclass
class _State:
    model: Frontend
    am: AnalysisManager
    feeds: dict
    original: dict | None
    prev: dict | None = None
    ran: list[str] = field(default_factory=list)
    judge: Judge | None = None
    fidelity: Any = None  # the judged fidelity of the model as it is now, if measured
    judged_prev: dict | None = None  # outputs on the judge data after the last judged pass
    decided: dict = field(default_factory=dict)  # id(pass) -> options resolved while running

    def __post_init__(self):
        self.prev = self.original


def _snapshot(model: Frontend, am: AnalysisManager) -> Snapshot:
    cost = am.get(Cost)
    return Snapshot(len(model.view().nodes()), cost.params, cost.macs, model.nbytes(),
                    model.view().op_counts())
