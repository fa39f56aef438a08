"""Before/after tables and the JSON report of a pipeline run; also the textual IR dump."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from graphslim.ir import GraphView
from graphslim.verify import ErrorMetrics


@dataclass(frozen=True)
class Snapshot:
    nodes: int
    params: int
    macs: int
    bytes: int
    op_counts: dict

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "params": self.params, "macs": self.macs,
                "bytes": self.bytes, "op_counts": self.op_counts}


@dataclass
class PassRecord:
    text: str
    name: str
    lossless: bool
    seconds: float
    edits: int
    nodes_changed: int
    skipped: list
    stats: dict
    notes: list
    details: list = field(default_factory=list)
    after: Snapshot | None = None
    error_prev: ErrorMetrics | None = None
    error_orig: ErrorMetrics | None = None
    verified: str = "not run"
    fidelity: Any = None  # graphslim.fidelity.Fidelity on the judge data, where measured
    decided: dict = field(default_factory=dict)  # options resolved on this machine

    def as_dict(self) -> dict:
        return {
            "pass": self.text, "lossless": self.lossless, "seconds": round(self.seconds, 4),
            "edits": self.edits, "nodes_changed": self.nodes_changed,
            "skipped": [{"node": s.node, "reason": s.reason} for s in self.skipped],
            "stats": self.stats, "notes": self.notes, "details": self.details,
            "verified": self.verified,
            "after": self.after.as_dict() if self.after else None,
            "error_vs_previous": self.error_prev.as_dict() if self.error_prev else None,
            "error_vs_original": self.error_orig.as_dict() if self.error_orig else None,
            "fidelity": self.fidelity.as_dict() if self.fidelity else None,
        }


@dataclass
class Report:
    pipeline: str
    frontend: str
    original: Snapshot
    records: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    final: Snapshot | None = None
    end_error: ErrorMetrics | None = None
    seconds: float = 0.0
    fidelity: Any = None  # the final model against the original on the judge data
    metric_before: float | None = None
    decided: str = ""  # the pipeline as run, machine-dependent choices written in
    extra: dict = field(default_factory=dict)  # what tools add (latency, decided pipeline)

    @property
    def judged_on(self) -> str | None:
        """eval, calibration, inputs or synthetic: the data the fidelity is measured on (None
        with verify=off)."""
        return self.fidelity.data if self.fidelity is not None else None

    def skipped(self) -> list:
        return [s for r in self.records for s in r.skipped]

    def as_dict(self) -> dict:
        return {"pipeline": self.pipeline, "decided": self.decided or self.pipeline,
                "frontend": self.frontend, "notes": self.notes,
                "original": self.original.as_dict(),
                "final": self.final.as_dict() if self.final else None,
                "passes": [r.as_dict() for r in self.records],
                "end_error": self.end_error.as_dict() if self.end_error else None,
                "fidelity": self.fidelity_dict(),
                "seconds": round(self.seconds, 4), **self.extra}

    def fidelity_dict(self) -> dict | None:
        """The final model against the original: which data, how many samples, cosine, rel
        L2, SQNR, top-1 agreement, and the user's metric before and after."""
        if self.fidelity is None:
            return None
        out = self.fidelity.as_dict()
        out["metric_before"] = self.metric_before
        out["metric_after"] = out.pop("metric")
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)

    def table(self, skipped: bool = True) -> str:
        rows = [("step", "time", "edits", "skips", "nodes", "params", "MACs", "bytes",
                 "max|err|", "rel L2", "on")]
        o = self.original
        rows.append(("original", "", "", "", str(o.nodes), human(o.params), human(o.macs),
                     human(o.bytes, "B"), "", "", ""))
        for r in self.records:
            a = r.after or o
            err = r.error_prev
            on = r.fidelity.data if r.fidelity else ("seeded" if r.error_orig else "")
            rows.append((r.text, f"{r.seconds * 1e3:.0f} ms", str(r.edits), str(len(r.skipped)),
                         str(a.nodes), human(a.params), human(a.macs), human(a.bytes, "B"),
                         f"{err.max_abs:.2e}" if err else "-",
                         f"{r.error_orig.rel_l2:.2e}" if r.error_orig else "-", on))
        out = [format_rows(rows)]
        if self.decided and self.decided != self.pipeline:
            out.append(f"\ndecided pipeline (reproduces this run elsewhere): {self.decided}")
        if self.fidelity is not None:
            f = self.fidelity
            metric = "" if self.metric_before is None else \
                f"; metric {self.metric_before:.4g} -> {f.metric:.4g}"
            loud = " (SYNTHETIC: says nothing about accuracy)" if f.data == "synthetic" else ""
            out.append(f"\nfidelity vs original on {f.samples} {f.data} samples{loud}: "
                       f"{f.brief(metric=False)}{metric}")
        if self.final is not None:
            out.append(f"\nops before: {_ops(o.op_counts)}\n"
                       f"ops after:  {_ops(self.final.op_counts)}")
        if skipped and self.skipped():
            out.append("\nleft unchanged:")
            out.extend(f"  {s.node}: {s.reason}" for s in self.skipped())
        notes = [*self.notes, *(f"{r.name}: {n}" for r in self.records for n in r.notes)]
        if notes:
            out.append("\nnotes: " + "; ".join(notes))
        return "\n".join(out)


def _ops(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:12])


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_rows(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_rows(rows: list[tuple]) -> str:
    """A GitHub markdown table; the first row is the header."""
    lines = ["| " + " | ".join(map(str, rows[0])) + " |",
             "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]]
    return "\n".join(lines)


def format_view(view: GraphView) -> str:
    """One line per node: `out = Op<kind>(inputs) [role:shape ...]`, MLIR-like."""
    lines = [f"graph({', '.join(view.inputs)}) -> ({', '.join(view.outputs)})  [{view.frontend}]"]
    for n in view.nodes():
        params = " ".join(f"{r}:{'x'.join(map(str, view.param_info(n.name, r)[0]))}"
                          for r in n.params)
        lines.append(f"  %{n.output} = {n.op}<{n.kind.value}>({', '.join(n.inputs)})"
                     + (f" [{params}]" if params else "") + f"  # {n.name}")
    return "\n".join(lines)


class PrintIRAfter:
    """Instrument: print the IR after the named passes ('all' for every pass) to `stream`."""

    def __init__(self, names: str | tuple = "all", stream=None):
        import sys
        self.names = names
        self.stream = stream or sys.stderr

    def after_pass(self, p, model, record) -> None:
        if self.names == "all" or p.name in self.names:
            print(f"// ----- IR after {record.text} -----", file=self.stream)
            print(format_view(model.view()), file=self.stream)
