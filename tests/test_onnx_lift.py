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


def _encoder_like(path, seed=0) -> str:
    """An opset-17 graph with what a transformer's torch export holds and onnx2torch alone
    does not handle: linear layers as MatMul + bias Add on [batch, tokens, features], a
    GreaterOrEqual (its opset-16 version) and a Flatten at axis 2 of a 2-D mask."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", rng.normal(0, 0.3, (8, 16))), ("b1", rng.normal(0, 0.1, 16)),
        ("w2", rng.normal(0, 0.3, (16, 8))), ("b2", rng.normal(0, 0.1, 8))]]
    inits += [numpy_helper.from_array(np.array(1, np.int64), "one"),
              numpy_helper.from_array(np.array([-1, 6, 1], np.int64), "shape")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1/MatMul"),
        helper.make_node("Add", ["b1", "h1"], ["h2"], name="fc1/Add"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "w2"], ["h4"], name="fc2/MatMul"),
        helper.make_node("Add", ["h4", "b2"], ["h5"], name="fc2/Add"),
        helper.make_node("GreaterOrEqual", ["mask", "one"], ["keep"], name="keep"),
        helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Flatten", ["keepf"], ["flat"], axis=2, name="flatten"),
        helper.make_node("Reshape", ["flat", "shape"], ["keep3"], name="reshape"),
        helper.make_node("Mul", ["h5", "keep3"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "encoder_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6, 8]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_lift_trains_matmul_weights_and_converts_what_onnx2torch_lacks(tmp_path):
    """The lifted module matches ONNX Runtime (GreaterOrEqual-16 and Flatten axis 2 included);
    the MatMul weights and their bias Adds are parameters, so distilling the graph towards
    another one's outputs changes them and the lowered file computes what the trained module
    does, closer to the teacher than the start."""
    from graphslim.frontends.onnx_lift import lift, trained_params

    student = graphslim.load(_encoder_like(tmp_path / "s.onnx", seed=0))
    teacher = graphslim.load(_encoder_like(tmp_path / "t.onnx", seed=1))
    rng = np.random.default_rng(2)
    data = {"x": rng.normal(size=(256, 6, 8)).astype(np.float32),
            "mask": rng.integers(0, 2, (256, 6)).astype(np.int64)}
    module = lift(student)
    assert len(list(module.parameters())) == 4
    trained = graphslim.distill(student, teacher, data, epochs=20, batch_size=32, lr=1e-2,
                                patience=20)
    changed = trained_params(student, lift(trained))
    assert {n for n, _ in changed} == {"fc1/MatMul", "fc1/Add", "fc2/MatMul", "fc2/Add"}
    held = {"x": data["x"][:4] * 0.5, "mask": data["mask"][:4]}
    ref = teacher.run(held)
    before, after = compare(ref, student.run(held)), compare(ref, trained.run(held))
    assert after.rel_l2 < 0.5 * before.rel_l2, (before.rel_l2, after.rel_l2)
    onnx.checker.check_model(trained.to_proto(), full_check=True)
