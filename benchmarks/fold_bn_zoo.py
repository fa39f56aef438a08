"""fold-bn over torchvision's classification models, on fx and on the ONNX export (BN kept).

    python benchmarks/fold_bn_zoo.py [--models resnet18,densenet121]
        [--out benchmarks/results/fold_bn_zoo.md]

Per model and frontend: BatchNorms before/after, the reasons for each one left, the relative L2
error of the outputs vs the original (every row passed the pass manager's fp32 check: rtol 1e-4,
atol 1e-5 x max(1, max|ref|)), and the pass time (with verification). Weights are random
(weights=None) with non-trivial BN statistics; the question here is exactness, not accuracy.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import Counter

import torch
import torchvision

import graphslim
from graphslim.report import format_rows, markdown_rows

_INPUT = {"inception_v3": 299}


def randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return module


def _reason_summary(report) -> str:
    kinds = Counter()
    for s in report.skipped():
        first = s.reason.split(";")[0].removeprefix("backward: ")
        kinds[first.split("'")[0].strip() + ("..." if "'" in first else "")] += 1
    return "; ".join(f"{n}x {k}" for k, n in kinds.most_common(3))


def run_model(name: str, tmpdir: str) -> list[tuple]:
    torch.manual_seed(0)
    module = randomize_bn(torchvision.models.get_model(name, weights=None).eval())
    size = _INPUT.get(name, 224)
    x = torch.randn(1, 3, size, size)
    rows = []
    path = os.path.join(tmpdir, f"{name}.onnx")
    torch.onnx.export(module, (x,), path, input_names=["x"], opset_version=17, dynamo=False,
                      do_constant_folding=False)
    for frontend in ("fx", "onnx"):
        model = graphslim.trace(module, x) if frontend == "fx" else graphslim.load(path)
        bn_before = sum("BatchNorm" in n.op for n in model.view().nodes())
        t0 = time.perf_counter()
        try:
            result = graphslim.optimize(model, "fold-bn")
        except graphslim.GraphslimError as exc:
            rows.append((name, frontend, bn_before, "-", "-", "FAIL", str(exc)[:80]))
            continue
        seconds = time.perf_counter() - t0
        rec = result.report.records[0]
        bn_after = sum("BatchNorm" in n.op for n in result.model.view().nodes())
        err = f"{rec.error_prev.rel_l2:.1e}" if rec.error_prev else "0"
        rows.append((name, frontend, bn_before, bn_after, err, f"{seconds:.1f}s",
                     _reason_summary(result.report)))
        del model, result  # the largest models hold several GB per copy
        gc.collect()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", help="comma-separated names (default: all classification models)")
    p.add_argument("--skip", default="", help="comma-separated names to leave out")
    p.add_argument("--out", default="benchmarks/results/fold_bn_zoo.md")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else \
        torchvision.models.list_models(module=torchvision.models)
    names = [n for n in names if n not in args.skip.split(",")]
    rows = [("model", "frontend", "BN before", "BN after", "rel L2 err", "time", "why left")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for row in run_model(name, tmp):
                rows.append(row)
                print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
    table = format_rows(rows)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("# fold-bn over torchvision classification models\n\n")
            f.write(f"Command: `python benchmarks/fold_bn_zoo.py"
                    f"{' --models ' + args.models if args.models else ''}"
                    f"{' --skip ' + args.skip if args.skip else ''}`\n\n"
                    f"{markdown_rows(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
