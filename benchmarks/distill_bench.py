"""Distillation: accuracy recovered and time per epoch, on the CPU (graphslim.distill).

    python -m graphslim.benchmarks.distill_bench [--out benchmarks/results/distill.md]

The MNIST CNN (trained here on the 4000 training digits of MNIST-5k) pruned to a quarter of its
MACs, then distilled from the original on the training digits without labels, with labels, and
after `reconstruct`; accuracy on the 1000 held-out digits. The same as an ONNX file through
slim-distill's path (lift, distil, lower). Time per epoch over all 5000 digits (timing only:
that run's weights are not judged), at the thread count torch uses here. The CPU and its ISA
flags are in the header.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import numpy as np
import torch

import graphslim
from graphslim.benchmarks import mnist_cnn
from graphslim.runtime import cpu_info


def _pruned(frontend: str, workdir: str, pipeline: str):
    from graphslim.benchmarks.assets import export_onnx

    (xtr, _), _ = mnist_cnn.data()
    if frontend == "fx":
        model = graphslim.trace(mnist_cnn.trained(), mnist_cnn.example())
    else:
        model = graphslim.load(export_onnx(mnist_cnn.trained(), mnist_cnn.example(),
                                           os.path.join(workdir, "cnn.onnx")))
    name = model.input_specs()[0].name
    return model, graphslim.optimize(model, pipeline, data={name: xtr[:128]})


def _accuracy(model) -> float:
    _, (x, y) = mnist_cnn.data()
    if hasattr(model, "module"):
        return mnist_cnn.accuracy(model.module)
    name = model.input_specs()[0].name
    out = np.concatenate([next(iter(model.run({name: x[i:i + 1]}).values()))
                          for i in range(len(x))])
    return float((out.argmax(1) == y).mean())


def rows(workdir: str, epochs: int = 2) -> list[dict]:
    (xtr, ytr), (xte, _) = mnist_cnn.data()
    teacher = mnist_cnn.trained()
    out = []
    for frontend, pipeline, labels in (
            ("fx", "prune-channels{ratio=0.5}", False),
            ("fx", "prune-channels{ratio=0.5}", True),
            ("fx", "prune-channels{ratio=0.5},reconstruct", False),
            ("onnx", "prune-channels{ratio=0.5}", False)):
        original, res = _pruned(frontend, workdir, pipeline)
        before = _accuracy(res.model)
        history: list = []
        t = time.perf_counter()
        student = graphslim.distill(res.model, teacher if frontend == "fx" else original, xtr,
                                    epochs=epochs, labels=ytr if labels else None,
                                    history=history)
        out.append({"frontend": frontend, "pipeline": pipeline, "labels": labels,
                    "macs": res.report.final.macs / res.report.original.macs,
                    "original": _accuracy(original), "before": before,
                    "after": _accuracy(student), "epochs": epochs,
                    "seconds": time.perf_counter() - t,
                    "per_epoch": float(np.mean([h["seconds"] for h in history]))})
        print(_line(out[-1]), flush=True)
    _, res = _pruned("fx", workdir, "prune-channels{ratio=0.5}")
    history = []
    graphslim.distill(res.model, teacher, np.concatenate([xtr, xte]), epochs=1, history=history)
    out.append({"timing": True, "per_epoch": history[0]["seconds"], "samples": 5000})
    print(f"one epoch over 5000 digits: {history[0]['seconds']:.1f} s", flush=True)
    return out


def _line(r: dict) -> str:
    return (f"| {r['frontend']} | `{r['pipeline']}` | {'yes' if r['labels'] else 'no'} | "
            f"{r['macs']:.2f}x | {r['original']:.3f} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['epochs']} | {r['per_epoch']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    cpu = cpu_info()
    header = [
        "# Distillation: accuracy recovered and time per epoch", "",
        f"Produced by `python -m graphslim.benchmarks.distill_bench --out {args.out}` on "
        f"{datetime.date.today()}, {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX2'}), "
        f"{cpu['cores']} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        "threads. MNIST CNN, students trained on the 4000 training digits (unlabeled unless "
        "'labels'), accuracy on the 1000 held-out digits; onnx: the ONNX file lifted to torch, "
        "distilled from the original file run in ONNX Runtime, lowered back and judged as a "
        "file.", "",
        "| frontend | pipeline | labels | MACs | original | compressed | + distill | epochs "
        "| s / epoch (4000) |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        found = rows(workdir, args.epochs)
    timing = found.pop()
    footer = ["", f"One epoch over all 5000 digits (timing only): {timing['per_epoch']:.1f} s."]
    print(footer[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header + [_line(r) for r in found] + footer) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
