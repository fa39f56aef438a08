"""Engine cost: load + fold-bn + verify + save of resnet50's ONNX file, against plain onnx.load +
onnx.save of the same file, in the same run (ratios hold on a noisy machine).

    python benchmarks/engine_cost.py [--model resnet50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import onnx
import torch
import torchvision

import graphslim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/engine_cost.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        module = torchvision.models.get_model(args.model, weights=None).eval()
        torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), src, input_names=["x"],
                          opset_version=17, dynamo=False, do_constant_folding=False)
        size = os.path.getsize(src) / 1e6
        plain, engine, verify_off = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            onnx.save(onnx.load(src), dst)
            plain.append(time.perf_counter() - t0)
            for verify, acc in (("each", engine), ("off", verify_off)):
                t0 = time.perf_counter()
                result = graphslim.optimize(graphslim.load(src), "fold-bn", verify=verify,
                                            inplace=True)
                result.model.save(dst)
                acc.append(time.perf_counter() - t0)
    t_plain, t_eng, t_off = (statistics.median(x) for x in (plain, engine, verify_off))
    lines = [
        f"# Engine cost: {args.model} ({size:.0f} MB ONNX), median of {args.repeats}",
        "",
        "Command: `python benchmarks/engine_cost.py`",
        "",
        "| step | seconds | x onnx.load+save |",
        "|---|---:|---:|",
        f"| onnx.load + onnx.save | {t_plain:.2f} | 1.00 |",
        f"| graphslim load + fold-bn + verify=each + save | {t_eng:.2f} | {t_eng / t_plain:.1f} |",
        f"| graphslim load + fold-bn + verify=off + save | {t_off:.2f} | {t_off / t_plain:.1f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
