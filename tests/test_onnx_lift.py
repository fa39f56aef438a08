"""Fine-tuning ONNX files: lift to torch (onnx2torch), distil, lower back to ONNX (slim-distill).

The lift and the lowering of real third-party files (after pruning) reproduce the file on real
inputs; the MNIST CNN as an ONNX file, pruned to a quarter of its MACs, is distilled by the
command-line tool on unlabeled training digits and judged on the held-out digits."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphslim
from graphslim.benchmarks import mnist_cnn
from graphslim.benchmarks.assets import PPOCR_CLS, export_onnx, text_line_crops
from graphslim.verify import compare
from tests.conftest import package_file

pytest.importorskip("onnx2torch")


def test_lift_and_lower_a_pruned_real_file_round_trip():
    """PP-OCR's classifier (weights in Constant nodes, opset 11) pruned at 0.3: lifted, then
    lowered (its weights written back), it gives the pruned file's outputs on real text lines
    (cosine > 0.99999): the same nodes, inputs and outputs."""
    from graphslim.frontends.onnx_lift import lift, lower

    src = package_file(*PPOCR_CLS)
    pruned = graphslim.optimize(graphslim.load(src, input_shapes={"x": (1, 3, 48, 192)}),
                                "prune-channels{ratio=0.3}").model
    module = lift(pruned)
    back = lower(module, pruned)
    assert [s.name for s in back.input_specs()] == ["x"]
    assert [n.name for n in back.view().nodes()] == [n.name for n in pruned.view().nodes()]
    x, _ = text_line_crops()
    for i in range(0, 12, 3):
        ref, got = pruned.run({"x": x[i:i + 1]}), back.run({"x": x[i:i + 1]})
        assert compare(ref, got).cosine > 0.99999


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_slim_distill_recovers_a_pruned_onnx_file(tmp_path):
    """ratio 0.5 on the ONNX file (0.25x MACs, accuracy ~0.50 on held-out digits); slim-distill
    for 2 epochs on the 4000 unlabeled training digits: within 1 point of the original, the
    JSON report holding the agreement before and after, the inputs untouched."""
    (xtr, _), (xte, yte) = mnist_cnn.data()
    teacher = export_onnx(mnist_cnn.trained(), mnist_cnn.example(), tmp_path / "cnn.onnx")
    model = graphslim.load(teacher)
    name = model.input_specs()[0].name
    res = graphslim.optimize(model, "prune-channels{ratio=0.5}", data={name: xtr[:128]})
    student = tmp_path / "pruned.onnx"
    res.model.save(student)
    np.savez(tmp_path / "train.npz", **{name: xtr})
    np.savez(tmp_path / "eval.npz", **{name: xte[::4]})  # 250 digits, every class
    hashes = {p: _sha(p) for p in (teacher, student)}
    out, report = tmp_path / "distilled.onnx", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "graphslim.tools.slim_distill", str(student), "--teacher",
           str(teacher), "--data", str(tmp_path / "train.npz"), "--eval-data",
           str(tmp_path / "eval.npz"), "-o", str(out), "--epochs", "2", "--json", str(report)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert {p: _sha(p) for p in hashes} == hashes
    onnx.checker.check_model(onnx.load(out), full_check=True)

    def accuracy(path):
        m = graphslim.load(path)
        got = np.concatenate([next(iter(m.run({name: xte[i:i + 1]}).values()))
                              for i in range(len(xte))])
        return float((got.argmax(1) == yte).mean())

    acc0, acc_pruned, acc = accuracy(teacher), accuracy(student), accuracy(out)
    rep = json.loads(report.read_text())
    print(f"\nONNX MNIST 0.25x MACs: {acc0:.3f} -> pruned {acc_pruned:.3f} -> distilled "
          f"{acc:.3f}; agreement {rep['before']['agreement']:.3f} -> "
          f"{rep['after']['agreement']:.3f}")
    assert acc_pruned < acc0 - 0.2
    assert acc >= acc0 - 0.01
    assert rep["after"]["agreement"] >= 0.97 > rep["before"]["agreement"]
    assert len(rep["epochs"]) == 2


def test_slim_distill_never_overwrites_its_input(tmp_path):
    teacher = export_onnx(mnist_cnn.trained(), mnist_cnn.example(), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 28, 28), np.float32))
    before = _sha(teacher)
    run = subprocess.run([sys.executable, "-m", "graphslim.tools.slim_distill", str(teacher),
                          "--teacher", str(teacher), "--data", str(tmp_path / "d.npz"), "-o",
                          str(teacher)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "refusing to overwrite" in run.stderr
    assert _sha(teacher) == before
