"""conv-substitute / conv-group / conv-separable: ORT CPU latency of each rewritten site alone and
of the whole model, before and after, in one run (interleaved medians), one row per rewrite.

    python -m graphslim.benchmarks.conv_substitute_bench [--threads 1] [--repeats 10]
        [--out benchmarks/results/conv_substitute.md] [--only TEXT]

Cases: resnext50_32x4d with its grouped convs expanded to dense (as some converters emit), also
with the channels around them reordered -> `grouped`; resnet50 -> `to-matmul` (forced, and chosen
by measured latency); mobilenet_v3_large (SE blocks: 1x1 convs on one pixel) -> `to-matmul`
(Gemm); the classifier Linear -> `to-conv`, also on alexnet (9216 -> 4096 -> 4096 FC layers,
chosen by latency at batch 1 and at batch 32); resnet50 with its 1x1 convs written as MatMuls ->
`to-conv` (back to Conv); resnet50 -> `conv-group` (approximate);
resnet18 -> `conv-separable`. Random weights: cost and speed only (accuracy and errors:
tests/test_conv_substitute.py, tests/test_conv_forms.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torchvision

import graphslim
from graphslim.benchmarks.models import expand_groups, shuffle_bottlenecks
from graphslim.edits import Layer
from graphslim.ir import OpKind, conv_geometry
from graphslim.report import format_rows, markdown_rows
from graphslim.runtime import compare, make_session, session_runner
from graphslim.sites import measure_chain
from graphslim.verify import make_inputs

CASES = [
    ("resnext50_32x4d (groups expanded)", "resnext50_32x4d", "expand",
     "conv-substitute{rewrites=grouped}"),
    ("resnext50_32x4d (expanded, reordered)", "resnext50_32x4d", "expand+shuffle",
     "conv-substitute{rewrites=grouped}"),
    ("resnet50", "resnet50", "", "conv-substitute{rewrites=to-matmul}"),
    ("resnet50", "resnet50", "", "conv-substitute{rewrites=to-matmul,choose=latency}"),
    ("mobilenet_v3_large", "mobilenet_v3_large", "", "conv-substitute{rewrites=to-matmul}"),
    ("mobilenet_v3_large", "mobilenet_v3_large", "",
     "conv-substitute{rewrites=to-matmul,choose=latency}"),
    ("mobilenet_v3_large", "mobilenet_v3_large", "", "conv-substitute{rewrites=to-conv}"),
    ("mobilenet_v3_large", "mobilenet_v3_large", "",
     "conv-substitute{rewrites=to-conv,choose=latency}"),
    ("alexnet", "alexnet", "", "conv-substitute{rewrites=to-conv,choose=latency}"),
    ("alexnet", "alexnet", "", "conv-substitute{rewrites=to-conv,choose=latency,batch=32}"),
    ("resnet50 (1x1 convs as MatMul)", "resnet50", "as-matmul",
     "conv-substitute{rewrites=to-conv}"),
    ("resnet50", "resnet50", "", "conv-group{groups=4}"),
    ("resnet18", "resnet18", "", "conv-separable{multiplier=1}"),
    ("resnet18", "resnet18", "", "conv-separable{multiplier=2}"),
    ("resnet18", "resnet18", "", "conv-separable{multiplier=1,choose=latency}"),
]
_FORMS = {"to-matmul": "matmul", "to-gemm": "gemm", "to-conv": "conv"}


def _as_layer(view, node, **kw) -> Layer:
    geometry = conv_geometry(node) if node.kind is OpKind.CONV else ()
    groups = node.attrs.get("groups", 1) if node.kind is OpKind.CONV else 1
    return Layer(node.kind, view.param(node.name, "weight"), None, groups, *geometry, **kw)


def _site_latency(model, result, threads: int) -> str:
    """Latency of the costliest rewritten site, before and after, timed as choose=latency times
    it: alone between two identity depthwise convs that keep ORT's NCHWc layout (forms: the same
    layer in its new op; other rewrites: the new layers read off the result)."""
    details = result.report.records[-1].details
    if not details:
        return "-"
    view, shapes = model.view(), model.infer_shapes()
    macs = {n.name: c for n, c in zip(view.nodes(), _macs(model))}
    d = max(details, key=lambda d: macs.get(d["node"], 0))
    node = view.node(d["node"])
    new_view = result.model.view()
    if d["rewrite"] == "matmul-to-conv":  # the Reshape/MatMul/Reshape chain became one conv
        conv = next(n for n in new_view.nodes() if n.name.startswith(d["nodes"][0]))
        layer = _as_layer(new_view, conv)
        original, chain = (Layer(OpKind.CONV, layer.weight, form="matmul"),), [layer]
        in_shape = result.model.infer_shapes()[conv.inputs[0]]
    elif d["rewrite"] in _FORMS:
        original, in_shape = (_as_layer(view, node),), shapes[node.inputs[0]]
        chain = [_as_layer(view, node, form=_FORMS[d["rewrite"]])]
    else:
        original, in_shape = (_as_layer(view, node),), shapes[node.inputs[0]]
        chain = [_as_layer(new_view, n) for n in new_view.nodes()
                 if n.name.startswith(node.name) and n.kind is OpKind.CONV]
    if not chain:
        return "-"
    a, b = measure_chain(original, chain, in_shape, threads=threads, context=True)
    return (f"{node.name}: {a.median * 1e3:.3f} -> {b.median * 1e3:.3f} "
            f"({a.median / b.median:.2f}x)")


def _macs(model) -> list[int]:
    from graphslim.analyses.cost import node_macs

    view, shapes = model.view(), model.infer_shapes()
    return [node_macs(view, n, shapes) for n in view.nodes()]


def _prepare(name: str, how: str) -> torch.nn.Module:
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None).eval()
    if "expand" in how:
        expand_groups(module)
    if "shuffle" in how:
        shuffle_bottlenecks(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/conv_substitute.md")
    p.add_argument("--only", default="", help="run only cases whose model or pipeline "
                   "contains this text (and write no results file)")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.only in c[0] or args.only in c[3]]
    if args.only:
        args.out = ""
    rows = [("model", "pipeline", "sites", "MACs x", "model ms before", "model ms after",
             "speedup", "largest site ms in context (before -> after)")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, how, text in cases:
            module = _prepare(name, how)
            path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), path, input_names=["x"],
                              opset_version=17, dynamo=False)
            model = graphslim.load(path)
            if how == "as-matmul":  # a model whose 1x1 convs a converter wrote as MatMuls
                model = graphslim.optimize(model, "conv-substitute{rewrites=to-matmul}").model
                model.save(path)
            result = graphslim.optimize(model, text)
            out = os.path.join(tmp, "o.onnx")
            result.model.save(out)
            feeds = make_inputs(model.input_specs())
            a, b = (make_session(f, threads=args.threads) for f in (path, out))
            la, lb = compare(session_runner(a, feeds), session_runner(b, feeds),
                             repeats=args.repeats)
            o, f = result.report.original, result.report.final
            rec = result.report.records[-1]
            considered = len(rec.details) + len(rec.skipped)
            rows.append((label, text, f"{len(rec.details)}/{considered}",
                         f"{f.macs / o.macs:.2f}", f"{la.median * 1e3:.1f}",
                         f"{lb.median * 1e3:.1f}", f"{la.median / lb.median:.2f}",
                         _site_latency(model, result, args.threads)))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(format_rows(rows))
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("# Convolution substitution\n\nCommand: `python -m graphslim.benchmarks."
                     f"conv_substitute_bench --threads {args.threads} --repeats {args.repeats}`; "
                     "ONNX Runtime CPU, opt level ALL, batch 1, 224x224, "
                     "interleaved medians. `sites`: rewritten / considered (rewritten + "
                     "skipped with a reason). Site: the costliest rewritten layer alone, between "
                     "two identity depthwise convs (graphslim.sites, context=True).\n\n"
                     f"{markdown_rows(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
