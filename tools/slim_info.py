"""slim-info: ops, parameters and MACs per layer of an ONNX file, and its channel groups.

    slim-info model.onnx [--input-shape x:1,3,224,224] [--layers 20] [--groups] [--json FILE]

The channel-group summary (ChannelDeps, what prune-channels sees) counts prunable, inexact and
blocked groups and says what blocks them; --groups lists every group. For a quantized (QDQ)
model, how many Conv and MatMul/Gemm nodes ONNX Runtime really runs in int8, read from the
graph it executes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from graphslim.analyses import AnalysisManager
from graphslim.analyses.channels import ChannelDepsAnalysis
from graphslim.analyses.cost import Cost
from graphslim.report import format_rows, human
from graphslim.tools._common import (
    EXIT_OK,
    add_input_shape_arg,
    check_output,
    load_model,
    run_tool,
    setup_logging,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slim-info", description=__doc__.strip().splitlines()[0])
    p.add_argument("input", help="ONNX file")
    add_input_shape_arg(p)
    p.add_argument("--layers", type=int, default=15, help="show the N costliest layers (0: all)")
    p.add_argument("--groups", action="store_true",
                   help="list every channel group (size, where it lives, what blocks it)")
    p.add_argument("--json", metavar="FILE", help="write per-layer costs as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-info", lambda: _run(args))


def _run(args) -> int:
    if args.json:
        check_output(args.json, (args.input,), "--json file")
    model = load_model(args.input, args.input_shape)
    view = model.view()
    cost = AnalysisManager(model).get(Cost)
    specs = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in model.input_specs())
    print(f"model:   {args.input}\ninputs:  {specs}\noutputs: {', '.join(view.outputs)}")
    print(f"nodes {len(view.nodes())}, params {human(cost.params)}, MACs {human(cost.macs)}, "
          f"weights {human(cost.weight_bytes, 'B')}")
    for note in model.load_notes:
        print(f"note: {note}")
    print("\nops: " + ", ".join(f"{k} {v}" for k, v in
                                sorted(view.op_counts().items(), key=lambda kv: -kv[1])))
    ranked = sorted(view.nodes(), key=lambda n: -cost.per_node[n.name].macs)
    if args.layers:
        ranked = ranked[:args.layers]
    rows = [("layer", "op", "kind", "params", "MACs", "% MACs", "bytes")]
    for n in ranked:
        c = cost.per_node[n.name]
        share = 100.0 * c.macs / cost.macs if cost.macs else 0.0
        rows.append((n.name, n.op, n.kind.value, human(c.params), human(c.macs), f"{share:.1f}",
                     human(c.bytes, "B")))
    print("\n" + format_rows(rows))
    counts = view.op_counts()
    if counts.get("QuantizeLinear") or counts.get("DequantizeLinear"):
        from graphslim.runtime import int8_kernels

        k = int8_kernels(model.model_ref())
        print(f"\nint8 under ONNX Runtime (CPU): Conv {k['conv'][0]} of {k['conv'][1]}, "
              f"MatMul/Gemm {k['matmul'][0]} of {k['matmul'][1]}")
    deps = AnalysisManager(model).get(ChannelDepsAnalysis)
    _print_groups(deps, args.groups)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n.name: {"op": n.op, **vars(cost.per_node[n.name])}
                       for n in view.nodes()}, f, indent=1)
    return EXIT_OK


def _print_groups(deps, every: bool) -> None:
    s = deps.summary()
    blocked = [g for g in deps.groups if not g.prunable]
    print(f"\nchannel groups: {s['groups']} ({s['prunable']} prunable with {s['channels']} "
          f"units, {s['inexact']} inexact, {len(blocked)} blocked)")
    reasons = Counter(r.split(": ", 1)[-1] for g in blocked for r in g.blocked[:1])
    for reason, n in reasons.most_common(8):
        print(f"  blocked x{n}: {reason}")
    if every:
        rows = [("group", "units", "lives in", "status")]
        for g in deps.groups:
            status = "blocked: " + g.blocked[0] if g.blocked else \
                "inexact: " + g.inexact[0] if g.inexact else "prunable"
            more = f" +{len(g.spaces) - 2}" if len(g.spaces) > 2 else ""
            rows.append((str(g.index), str(g.size), ", ".join(g.spaces[:2]) + more, status))
        print("\n" + format_rows(rows))


if __name__ == "__main__":
    sys.exit(main())
