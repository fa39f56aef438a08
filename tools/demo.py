"""slim-demo: the main job on the embedded default model.

Loads the CNN that ships with graphslim (graphslim/data/digits_cnn.onnx: 36 MMAC, trained on
real MNIST digits, exported dense with its BatchNorms; tools/make_demo_model.py), compresses it
with channel pruning and int8, calibrated on 200 of the 1,000 held-out real digits and judged on
the other 800 (disjoint), and prints the before/after table, the accuracy, MACs, size and ONNX
Runtime latency (interleaved A/B, 1 thread) with the CPU it was measured on.

    slim-demo [--pipeline P] [--out out/digits_cnn_slim.onnx] [--json FILE]
              [--export-data DIR]   (also write DIR/digits_calib.npz and DIR/digits_eval.npz)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

import numpy as np

import graphslim
from graphslim.report import human
from graphslim.runtime import compare, cpu_description, make_session, session_runner
from graphslim.tools._common import EXIT_OK, check_output, run_tool, setup_logging

DEFAULT_PIPELINE = "prune-channels{ratio=0.5,criterion=bn-scale},fold-bn,qdq{choose=latency}"
CALIB = 200  # 200 of the held-out digits calibrate (every fifth: 20 of each class; the file is
# sorted by class, so its first 200 were all zeros and ones); the other 800 evaluate


def demo_files() -> tuple[str, str]:
    data = resources.files("graphslim") / "data"
    return str(data / "digits_cnn.onnx"), str(data / "mnist_test.npz")


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,000 held-out real digits as the model's input (normalized, N x 1 x 28 x 28),
    reordered so that the first CALIB (the calibration digits) hold every class alike."""
    with np.load(demo_files()[1]) as d:
        images, labels = d["images"], d["labels"]
    calib = np.arange(len(labels)) % (len(labels) // CALIB) == 0
    order = np.concatenate([np.flatnonzero(calib), np.flatnonzero(~calib)])
    x = ((images.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    return x[order], labels[order]


def accuracy(session, x: np.ndarray, labels: np.ndarray) -> float:
    logits = np.concatenate([session.run(None, {"image": x[i:i + 1]})[0]
                             for i in range(len(x))])
    return float((logits.argmax(1) == labels).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slim-demo", description=__doc__.strip().splitlines()[0])
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--out", default=os.path.join("out", "digits_cnn_slim.onnx"))
    p.add_argument("--json", metavar="FILE", help="write the demo's figures as JSON")
    p.add_argument("--export-data", metavar="DIR",
                   help="write the calibration and evaluation digits as .npz for slim-opt")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-demo", lambda: _run(args))


def _run(args) -> int:
    model_path, _ = demo_files()
    x, y = digits()
    if args.export_data:
        os.makedirs(args.export_data, exist_ok=True)
        np.savez(os.path.join(args.export_data, "digits_calib.npz"), image=x[:CALIB])
        np.savez(os.path.join(args.export_data, "digits_eval.npz"), image=x[CALIB:])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    check_output(args.out, (model_path,))
    model = graphslim.load(model_path, input_shapes={"image": (1, 1, 28, 28)})
    ey = y[CALIB:]
    print(f"graphslim demo: {os.path.basename(model_path)} (CNN trained on MNIST digits)")
    print(f"pipeline: {args.pipeline}")
    print(f"data: calibration {CALIB} real held-out digits, evaluation the other {len(ey)}\n")
    result = graphslim.optimize(
        model, args.pipeline, data={"image": x[:CALIB]}, eval_data={"image": x[CALIB:]},
        metric=lambda out: float((out["logits"].argmax(1) == ey).mean()))
    print(result.report.table())
    result.model.save(args.out)

    before = make_session(model_path, threads=1)
    after = make_session(args.out, threads=1)
    acc_b, acc_a = accuracy(before, x[CALIB:], ey), accuracy(after, x[CALIB:], ey)
    feed = {"image": x[:1]}
    lat_b, lat_a = compare(session_runner(before, feed), session_runner(after, feed),
                           repeats=300)
    rep = result.report
    figures = {
        "pipeline": args.pipeline, "decided": rep.decided, "cpu": cpu_description(),
        "threads": 1, "eval_samples": len(ey),
        "accuracy_before": acc_b, "accuracy_after": acc_a,
        "latency_ms_before": lat_b.median * 1e3, "latency_ms_after": lat_a.median * 1e3,
        "speedup": lat_b.median / lat_a.median,
        "macs_before": rep.original.macs, "macs_after": rep.final.macs,
        "bytes_before": os.path.getsize(model_path), "bytes_after": os.path.getsize(args.out)}
    print(f"\naccuracy on {len(ey)} held-out real digits (not calibrated on): "
          f"{acc_b:.4f} -> {acc_a:.4f}")
    print(f"MACs {human(figures['macs_before'])} -> {human(figures['macs_after'])} "
          f"({figures['macs_before'] / max(figures['macs_after'], 1):.1f}x fewer); file "
          f"{human(figures['bytes_before'], 'B')} -> {human(figures['bytes_after'], 'B')}")
    print(f"ORT CPU latency, 1 thread, batch 1, {figures['cpu']}: {lat_b} -> {lat_a} "
          f"({figures['speedup']:.2f}x)")
    print(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
