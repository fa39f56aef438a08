"""slim-demo: the main job on the embedded default model.

Loads the small CNN that ships with graphslim (trained on real MNIST digits, exported with its
BatchNorms), runs the default pipeline, and prints the before/after table, the accuracy on the
1,000 held-out real digits, and ONNX Runtime latency (interleaved A/B, 1 thread).

    slim-demo [--pipeline 'fold-bn'] [--out out/demo_cnn_slim.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

import numpy as np

import graphslim
from graphslim.runtime import compare, make_session, session_runner
from graphslim.tools._common import EXIT_OK, run_tool, setup_logging

DEFAULT_PIPELINE = "fold-bn"


def demo_files() -> tuple[str, str]:
    data = resources.files("graphslim") / "data"
    return str(data / "demo_cnn.onnx"), str(data / "mnist_test.npz")


def accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:
    x = ((images.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    logits = session.run(None, {"image": x})[0]
    return float((logits.argmax(1) == labels).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slim-demo", description=__doc__.strip().splitlines()[0])
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--out", default=os.path.join("out", "demo_cnn_slim.onnx"))
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return run_tool("slim-demo", lambda: _run(args))


def _run(args) -> int:

    model_path, data_path = demo_files()
    data = np.load(data_path)
    model = graphslim.load(model_path, input_shapes={"image": (1, 1, 28, 28)})
    print(f"graphslim demo: {os.path.basename(model_path)} (CNN trained on MNIST digits)")
    print(f"pipeline: {args.pipeline}\n")
    result = graphslim.optimize(model, args.pipeline)
    print(result.report.table())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result.model.save(args.out)

    before = make_session(model_path, threads=1)
    after = make_session(args.out, threads=1)
    acc_b = accuracy(before, data["images"], data["labels"])
    acc_a = accuracy(after, data["images"], data["labels"])
    x = {"image": np.zeros((1, 1, 28, 28), np.float32)}
    lat_b, lat_a = compare(session_runner(before, x), session_runner(after, x), repeats=200)
    print(f"\naccuracy on {len(data['labels'])} held-out real digits: {acc_b:.4f} -> {acc_a:.4f}")
    print(f"ORT CPU latency, 1 thread, batch 1: {lat_b} -> {lat_a} "
          f"({lat_b.median / lat_a.median:.2f}x)")
    print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
