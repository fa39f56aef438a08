"""conv-substitute / conv-separable: ORT CPU latency of each rewritten site alone and of the whole
model, before and after, in one run (interleaved medians).

    python -m benchmarks.conv_substitute_bench [--threads 1] [--repeats 10]
        [--out benchmarks/results/conv_substitute.md]

Cases: resnext50_32x4d with its grouped convs expanded to dense (as some converters emit) ->
`conv-substitute{rewrites=grouped}`; resnet18 -> `conv-separable{multiplier=1|2}`.
Random weights: only cost and speed are measured here (accuracy: tests/test_conv_substitute.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torchvision

import graphslim
import passes  # noqa: F401
from benchmarks.models import expand_groups
from graphslim.edits import Layer
from graphslim.ir import OpKind, conv_geometry
from graphslim.report import format_rows, markdown_rows
from graphslim.runtime import compare, make_session, session_runner
from graphslim.sites import measure_chain
from graphslim.verify import make_inputs

CASES = [("resnext50_32x4d (groups expanded)", "resnext50_32x4d", True,
          "conv-substitute{rewrites=grouped}"),
         ("resnet18", "resnet18", False, "conv-separable{multiplier=1}"),
         ("resnet18", "resnet18", False, "conv-separable{multiplier=2}")]


def _site_latency(model, result, threads: int) -> str:
    """Latency of the costliest rewritten site alone, before and after."""
    details = result.report.records[-1].details
    if not details:
        return "-"
    d = max(details, key=lambda d: d.get("macs_before", 0) or 0)
    view = model.view()
    node = view.node(d["node"])
    shapes = model.infer_shapes()
    original = (Layer(OpKind.CONV, view.param(node.name, "weight"), None, 1,
                      *conv_geometry(node)),)
    new_view = result.model.view()
    chain = []
    for n in new_view.nodes():  # the rewritten layers, in order, read off the new graph
        if n.name.startswith(node.name) and n.kind is OpKind.CONV:
            chain.append(Layer(OpKind.CONV, new_view.param(n.name, "weight"), None,
                               n.attrs["groups"], *conv_geometry(n)))
    if not chain:
        return "-"
    a, b = measure_chain(original, chain, shapes[node.inputs[0]], threads=threads)
    return f"{a.median * 1e3:.2f} -> {b.median * 1e3:.2f} ({a.median / b.median:.2f}x)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/conv_substitute.md")
    args = p.parse_args(argv)
    rows = [("model", "pipeline", "MACs x", "model ms before", "model ms after", "speedup",
             "largest site ms (alone)")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, expand, text in CASES:
            torch.manual_seed(0)
            module = torchvision.models.get_model(name, weights=None).eval()
            if expand:
                expand_groups(module)
            path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), path, input_names=["x"],
                              opset_version=17, dynamo=False)
            model = graphslim.load(path)
            result = graphslim.optimize(model, text)
            out = os.path.join(tmp, "o.onnx")
            result.model.save(out)
            feeds = make_inputs(model.input_specs())
            a, b = (make_session(f, threads=args.threads) for f in (path, out))
            la, lb = compare(session_runner(a, feeds), session_runner(b, feeds),
                             repeats=args.repeats)
            o, f = result.report.original, result.report.final
            rows.append((label, text, f"{f.macs / o.macs:.2f}", f"{la.median * 1e3:.1f}",
                         f"{lb.median * 1e3:.1f}", f"{la.median / lb.median:.2f}",
                         _site_latency(model, result, args.threads)))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(format_rows(rows))
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("# Convolution substitution\n\nCommand: `python -m "
                     f"benchmarks.conv_substitute_bench --threads {args.threads} --repeats "
                     f"{args.repeats}`; ONNX Runtime CPU, opt level ALL, batch 1, 224x224, "
                     f"interleaved medians.\n\n{markdown_rows(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
