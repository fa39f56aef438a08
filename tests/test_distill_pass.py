"""The `distill` pass: distillation as a pipeline step, the pipeline's input as the teacher.

MNIST CNN on both frontends, pruned to a quarter of its MACs then distilled in the same
pipeline on the 4000 unlabeled training digits: within a point of the original on the 1000
held-out digits; on an ONNX file the trained weights are written back into the file's own
nodes (no re-export), and slim-opt runs it like any pass."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import graphslim
from graphslim.benchmarks import mnist_cnn
from tests.conftest import make_model

pytest.importorskip("onnx2torch")


def _accuracy(model, name) -> float:
    _, (x, y) = mnist_cnn.data()
    step = 100 if model.name == "fx" else 1
    out = np.concatenate([next(iter(model.run({name: x[i:i + step]}).values()))
                          for i in range(0, len(x), step)])
    return float((out.argmax(1) == y).mean())


def test_prune_then_distill_in_one_pipeline(frontend, tmp_path):
    model = make_model(frontend, mnist_cnn.trained(), mnist_cnn.example(), tmp_path, "cnn")
    name = model.input_specs()[0].name
    (xtr, _), _ = mnist_cnn.data()
    acc0 = _accuracy(model, name)
    res = graphslim.optimize(model, "prune-channels{ratio=0.5},distill{epochs=2}",
                             data={name: xtr})
    rec = res.report.records[-1]
    acc = _accuracy(res.model, name)
    print(f"\n{frontend}: {acc0:.3f} -> prune + distill {acc:.3f}; {rec.stats}")
    assert res.report.final.macs <= 0.26 * res.report.original.macs
    assert acc >= acc0 - 0.01
    assert rec.stats["params_trained"] >= 6 and rec.stats["epochs_run"] == 2
    if frontend == "onnx":  # the same nodes, their weights set: no re-exported graph
        before = graphslim.optimize(model, "prune-channels{ratio=0.5}", data={name: xtr})
        assert [n.name for n in before.model.view().nodes()] == \
            [n.name for n in res.model.view().nodes()]


def test_distill_without_data_trains_nothing_and_slim_opt_refuses_it(tmp_path):
    model = make_model("onnx", mnist_cnn.trained(), mnist_cnn.example(), tmp_path, "cnn")
    res = graphslim.optimize(model, "prune-channels{ratio=0.5},distill")
    rec = res.report.records[-1]
    assert rec.edits == 0 and "no data given" in " ".join(rec.notes)
    run = subprocess.run([sys.executable, "-m", "graphslim.tools.slim_opt",
                          str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "-p",
                          "prune-channels{ratio=0.5},distill"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "distill needs calibration data" in run.stderr
