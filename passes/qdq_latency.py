"""qdq{choose=latency}: int8 where it is faster on this machine, float where it is not.

Whether int8 pays depends on the CPU (FIELD-NOTES "Machines differ": resnet18 3.4x with
AVX-512 VNNI, 1.14x with AVX2 only; many mobile and OCR models slower in int8 there), on the op
(depthwise convs, SiLU, residual adds) and on what surrounds it (QDQ pairs ORT cannot fuse cost
a quantize and a dequantize each). No cost model knows this, so it is measured: whole models, in
context, on ONNX Runtime CPU at the pass's thread count, all variants timed round-robin in one
process (graphslim.analyses.AnalysisManager.trial_latencies).

Variants, by region (an op class of the `ops` option, depthwise convs apart from dense ones):
the float model, int8 as asked, int8 without each region, and int8 with SiLU where the model has
it. A region whose removal makes the model at least `min-gain` faster is kept float; the
combination is timed again against float and the plain int8 plan; if no int8 variant beats
float by `min-gain`, the model stays float. The decision is written into the pipeline text
(`ops=...`, `exclude=...`, `choose=cost`), so the same pipeline reproduces it on another machine
without measuring.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from graphslim.ir import GraphView, OpKind
from graphslim.pass_base import Plan
from graphslim.runtime import cpu_description
from graphslim.verify import make_inputs


def regions(q, view: GraphView, op_class) -> dict[str, list[str]]:
    """Region -> node names the plan as configured would quantize: the op class of each node
    (conv, linear, add, ...; qdq's `op_class`), with depthwise convs as `dwconv`."""
    out: dict[str, list[str]] = {}
    for n in view.nodes():
        cls = op_class(n)
        if cls is None or cls not in q.ops or any(fnmatch.fnmatch(n.name, p)
                                                  for p in q.exclude):
            continue
        if cls == "conv" and _depthwise(view, n):
            cls = "dwconv"
        out.setdefault(cls, []).append(n.name)
    return out


def _depthwise(view: GraphView, n) -> bool:
    groups = n.attrs.get("groups", 1)
    return n.kind is OpKind.CONV and groups > 1 and \
        view.param_info(n.name, "weight")[0][1] == 1


def _without(q, region: str, names: list[str]):
    """The configuration with one region left float (None where nothing would be int8)."""
    if region == "dwconv":
        return dataclasses.replace(q, exclude=(*q.exclude, *names))
    ops = tuple(o for o in q.ops if o != region)
    return dataclasses.replace(q, ops=ops) if ops else None


def choose_by_latency(q, view: GraphView, analyses, op_class) -> Plan:
    """The plan of the fastest configuration measured (q: an InsertQDQ with choose=latency;
    op_class: qdq's node -> op class)."""
    base = dataclasses.replace(q, choose="cost", max_error=0.0)
    feeds = make_inputs(analyses.model.input_specs(), 0)
    threads = q.threads if q.threads > 0 else None
    found = regions(base, view, op_class)
    variants = {"float": None, "int8": base}
    for region, names in found.items():
        cfg = _without(base, region, names)
        if cfg is not None:
            variants[f"int8 without {region}"] = cfg
    if "silu" not in base.ops and "silu" in view.fused_activations:
        variants["int8 with silu"] = dataclasses.replace(base, ops=(*base.ops, "silu"))
    plans = {k: (v._plan(view, analyses) if v is not None else Plan())
             for k, v in variants.items()}
    lat = analyses.trial_latencies([p.edits for p in plans.values()], feeds, threads,
                                   max_time=5.0)
    if lat is None:
        plan = dataclasses.replace(q, choose="cost")._plan(view, analyses)
        plan.notes.append("choose=latency needs a model ONNX Runtime runs as is (the ONNX "
                          "frontend); chose by cost")
        return plan
    ms = {k: t.median * 1e3 for k, t in zip(variants, lat)}
    best = base
    slower = [r for r in found if f"int8 without {r}" in ms and
              ms[f"int8 without {r}"] < ms["int8"] * (1 - q.min_gain)]
    for region in slower:
        best = _without(best, region, found[region]) or best
    if "int8 with silu" in ms and ms["int8 with silu"] < ms["int8"] * (1 - q.min_gain):
        best = dataclasses.replace(best, ops=(*best.ops, "silu"))
    confirm = {"float": Plan(), "int8": plans["int8"]}
    if best != base:
        confirm["chosen"] = best._plan(view, analyses)
    again = analyses.trial_latencies([p.edits for p in confirm.values()], feeds, threads,
                                     max_time=5.0)
    ms2 = {k: t.median * 1e3 for k, t in zip(confirm, again)}
    pick = min((k for k in ms2 if k != "float"), key=ms2.get)
    chosen = best if pick == "chosen" else base
    where = f"{cpu_description()}, {q.threads or 'all'} thread(s)"
    if ms2[pick] >= ms2["float"] * (1 - q.min_gain):
        final = dataclasses.replace(q, choose="cost", exclude=("*",))
        plan = final._plan(view, analyses)
        plan.skipped.clear()  # one reason for all, not one line per node
        plan.notes.append(f"choose=latency: int8 is not {q.min_gain:.0%} faster than float on "
                          f"{where} (float {ms2['float']:.3f} ms, best int8 {ms2[pick]:.3f} ms):"
                          " the model stays float")
    else:
        final = dataclasses.replace(chosen, choose="cost", max_error=q.max_error)
        plan = final._plan(view, analyses)
        kept = slower if pick == "chosen" else []
        plan.notes.append(f"choose=latency on {where}: float {ms2['float']:.3f} ms, int8 "
                          f"{ms2['int8']:.3f} ms" + (f", chosen {ms2['chosen']:.3f} ms"
                                                    if "chosen" in ms2 else "")
                          + (f"; kept float: {', '.join(kept)}" if kept else ""))
    plan.details.append({"latency_ms": {k: round(v, 4) for k, v in ms.items()},
                         "confirm_ms": {k: round(v, 4) for k, v in ms2.items()},
                         "threads": q.threads, "cpu": cpu_description()})
    plan.decided.update({"choose": "cost", "ops": final.ops, "exclude": final.exclude})
    return plan
