"""Low-rank factorization on torchvision models: size, MACs, ORT CPU latency against the original
in the same run (interleaved), speedup efficiency, output error, and decomposition time.

    python benchmarks/factorize_bench.py [--models resnet18,resnet50,vgg16] [--threads 1]
        [--repeats 10] [--out benchmarks/results/factorize.md]

Speedup efficiency = latency speedup / MACs reduction (1.0: the runtime turns every saved MAC
into time). Weights are random (weights=None): errors here say nothing about accuracy (see
tests/test_factorize.py for a trained model), only about cost and speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

import graphslim
from graphslim.passes.lowrank_math import Tucker2Basis
from graphslim.report import format_rows, markdown_rows
from graphslim.runtime import compare, make_session, session_runner
from graphslim.verify import make_inputs

TUCKER = "factorize{{method=tucker2,rank={r},layers=conv}}"
FC = "factorize{{method=svd,rank={r},layers=linear,exclude=*classifier?6*}}"
PIPELINES = {
    "resnet18": [TUCKER.format(r=0.5), TUCKER.format(r=0.25)],
    "resnet50": [TUCKER.format(r=0.5), TUCKER.format(r=0.25)],
    "vgg16": [FC.format(r=512), FC.format(r=256), TUCKER.format(r=0.5), TUCKER.format(r=0.25),
              FC.format(r=512) + "," + TUCKER.format(r=0.5)],
}


def hosvd_seconds(name: str) -> tuple[int, float]:
    module = torchvision.models.get_model(name, weights=None)
    weights = [m.weight.detach().double().numpy() for m in module.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1]
    t0 = time.perf_counter()
    for w in weights:
        Tucker2Basis(w)
    return len(weights), time.perf_counter() - t0


def bench_model(name: str, threads: int, repeats: int, tmp: str) -> list[tuple]:
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None).eval()
    path = os.path.join(tmp, f"{name}.onnx")
    torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), path, input_names=["x"],
                      opset_version=17, dynamo=False)
    base = graphslim.load(path)
    feeds = make_inputs(base.input_specs())
    base_sess = make_session(path, threads=threads)
    rows = []
    for text in PIPELINES[name]:
        t0 = time.perf_counter()
        result = graphslim.optimize(base, text)
        seconds = time.perf_counter() - t0
        out = os.path.join(tmp, "f.onnx")
        result.model.save(out)
        sess = make_session(out, threads=threads)
        la, lb = compare(session_runner(base_sess, feeds), session_runner(sess, feeds),
                         repeats=repeats)
        o, f = result.report.original, result.report.final
        speedup, mac_cut = la.median / lb.median, o.macs / f.macs
        err = np.mean([r.error_orig.rel_l2 for r in result.report.records[-1:]])
        rows.append((name, text, f"{f.params / o.params:.2f}", f"{f.macs / o.macs:.2f}",
                     f"{la.median * 1e3:.1f}", f"{lb.median * 1e3:.1f}", f"{speedup:.2f}",
                     f"{speedup / mac_cut:.2f}", f"{err:.2e}", f"{seconds:.1f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50,vgg16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/factorize.md")
    args = p.parse_args(argv)
    rows = [("model", "pipeline", "params x", "MACs x", "ms before", "ms after", "speedup",
             "efficiency", "rel L2 err", "pass+verify s")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(bench_model(name, args.threads, args.repeats, tmp))
    n, secs = hosvd_seconds("resnet50")
    print(format_rows(rows))
    text = (f"# Low-rank factorization\n\nCommand: `python benchmarks/factorize_bench.py "
            f"--models {args.models} --threads {args.threads} --repeats {args.repeats}`; ONNX "
            f"Runtime CPU, {args.threads} thread(s), opt level ALL, batch 1, 224x224, "
            f"interleaved medians.\n\n{markdown_rows(rows)}\n\nHOSVD (Tucker-2 bases) of all {n} "
            f"KxK convs of resnet50: {secs:.2f} s.\n")
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
