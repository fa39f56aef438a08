"""Defects found by running the engine on real files it had never seen (issue 13), each with the
case that showed it. Every test here failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

import graphslim
from graphslim.passes.equalize import equalize_pair
from graphslim.verify import compare, is_close
from tests.conftest import package_file

PPOCR_DET = ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")


def test_nan_or_inf_is_never_close():
    ref = {"y": np.array([1.0, 2.0, 3.0], np.float32)}
    for bad in (np.nan, np.inf, -np.inf):
        got = {"y": np.array([1.0, bad, 3.0], np.float32)}
        m = compare(ref, got)
        assert m.nonfinite == 1 and not is_close(m)
        assert not np.isfinite(m.rel_l2)
    all_nan = {"y": np.full(3, np.nan, np.float32)}
    assert compare(ref, all_nan).nonfinite == 3
    # a reference that is itself NaN where the result is NaN too is no new failure
    both = {"y": np.array([1.0, np.nan, 3.0], np.float32)}
    assert is_close(compare(both, both))


def test_equalize_dead_channels_stay_finite():
    """A channel with weights ~1e-34 (PP-OCRv4's det model has two): r1 * r2 underflowed
    float32 to 0, s became 0 and the weights inf / NaN."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w1[1] *= 1e-34
    w2 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    w2[:, 1] *= 1e-12  # r1 * r2 = 1e-46: zero in float32
    w2[:, 2] *= 1e-30
    b1 = rng.standard_normal(4).astype(np.float32)
    n1, nb, n2 = equalize_pair(w1, b1, w2, depthwise2=False)
    assert all(np.isfinite(a).all() for a in (n1, nb, n2))
    # exact in real arithmetic: W2 diag(s) diag(1/s) W1 = W2 W1
    before = w2[:, :, 0, 0].astype(np.float64) @ w1.reshape(4, -1).astype(np.float64)
    after = n2[:, :, 0, 0].astype(np.float64) @ n1.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_equalize_real_ppocr_det_is_exact():
    """The real PP-OCRv4 text detector through `equalize`: it returned all-NaN outputs with
    exit 0 before; now the pass is exact and verification would fail on any NaN."""
    model = graphslim.load(package_file(*PPOCR_DET), input_shapes={"x": (1, 3, 64, 64)})
    result = graphslim.optimize(model, "equalize")
    rec = result.report.records[-1]
    assert rec.edits > 0 and rec.verified == "numerical"
    assert rec.error_prev.nonfinite == 0 and is_close(rec.error_prev)


@pytest.mark.parametrize("verify", ["each", "off"])
def test_qdq_below_opset_13_converts(verify, tmp_path):
    """The real PP-OCR angle classifier is opset 11: qdq wrote DequantizeLinear with `axis`
    (opset 13), failing onnx.checker, and with verify=off a file ORT rejects, exit 0."""
    import onnx
    import onnxruntime as ort

    from graphslim.benchmarks.assets import PPOCR_CLS, text_line_crops

    x, _ = text_line_crops()
    model = graphslim.load(package_file(*PPOCR_CLS), input_shapes={"x": (1, 3, 48, 192)})
    assert model.opset == 11
    result = graphslim.optimize(model, "fold-bn,qdq", data={"x": x[:16]}, verify=verify)
    out = tmp_path / "q.onnx"
    result.model.save(str(out))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 13
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) > 50
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x[16:17]})[0]
    ref = model.run({"x": x[16:17]})
    assert np.isfinite(got).all() and got.shape == next(iter(ref.values())).shape
    assert any("opset 11 converted to 13" in n for r in result.report.records for n in r.notes)


def _auto_pad_model(auto_pad: str, stride: int = 1):
    """Conv -> Relu -> BN -> Conv(auto_pad), as converted models write it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", rng.standard_normal((c, 3, 3, 3))), ("w2", rng.standard_normal((c, c, 3, 3))),
        ("s", rng.random(c) + 0.5), ("t", rng.standard_normal(c) * 2),
        ("m", rng.standard_normal(c)), ("v", rng.random(c) + 0.5)]]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["r", "s", "t", "m", "v"], ["b"], name="bn"),
        helper.make_node("Conv", ["b", "w2"], ["y"], auto_pad=auto_pad, strides=[stride] * 2,
                         name="conv2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 9, 9])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("auto_pad,stride", [("SAME_UPPER", 1), ("SAME_LOWER", 1),
                                             ("SAME_UPPER", 2), ("VALID", 1)])
def test_auto_pad_is_resolved(auto_pad, stride):
    """The op table ignored auto_pad: fold-bn folded a BN with a nonzero shift forward into a
    zero-padding conv and failed verification (max diff 20.9), aborting the pipeline."""
    model = graphslim.load(_auto_pad_model(auto_pad, stride))
    conv2 = model.view().node("conv2")
    if stride == 1:
        assert conv2.attrs["pads"] == {"SAME_UPPER": (1, 1, 1, 1), "SAME_LOWER": (1, 1, 1, 1),
                                       "VALID": (0, 0, 0, 0)}[auto_pad]
    else:
        assert conv2.attrs["pads"] is None  # depends on the input size
    assert "auto_pad" not in conv2.attrs
    result = graphslim.optimize(model, "fold-bn")  # verified: raises if outputs move
    ops = result.model.view().op_counts()
    # the BN shift cannot enter a padded conv; with VALID it folds forward exactly
    assert ops.get("BatchNormalization", 0) == (0 if auto_pad == "VALID" else 1)
    assert result.report.records[-1].verified in ("numerical", "not run")


def test_auto_pad_same_upper_even_kernel():
    from graphslim.frontends.onnx_ops import explicit_pads

    a = {"auto_pad": "SAME_UPPER", "dilations": [2, 1]}
    assert explicit_pads(a, (4, 2)) == (3, 0, 3, 1)
    assert explicit_pads({"auto_pad": "SAME_LOWER"}, (4, 2)) == (2, 1, 1, 0)


def _matmul_model(ir_version: int, opset: int, output_shape):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
                          [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


@pytest.mark.parametrize("ir_version,opset,shape", [(3, 7, [1, 3]), (8, 17, None)])
def test_files_ort_accepts_are_accepted(ir_version, opset, shape, tmp_path):
    """An opset-7 / IR-3 file ('W in initializer but not in graph input') and an output declared
    without a shape were refused; ORT runs both. Repaired on load, emitted checker-valid."""
    import onnx
    import onnxruntime as ort

    src = _matmul_model(ir_version, opset, shape)
    ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(src)
    path = tmp_path / "in.onnx"
    onnx.save(src, str(path))
    model = graphslim.load(str(path))
    assert model.load_notes
    out = tmp_path / "out.onnx"
    graphslim.optimize(model, "fold-bn").model.save(str(out))
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = np.ones((1, 2), np.float32)
    np.testing.assert_allclose(model.run({"x": x})["y"], [[3.0, 5.0, 7.0]])


def test_conv_group_on_real_orientation_classifier():
    """conv-group{groups=2} crashed on the real PP-LCNet orientation classifier
    (AttributeError: 'str' object has no attribute 'edits'): a channel reordering that could not
    be done was used as if it had been planned. Now such a conv keeps that order or is skipped
    with the reason, and the rest is grouped."""
    from graphslim.benchmarks.assets import ORIENTATION

    model = graphslim.load(package_file(*ORIENTATION), input_shapes={"x": (1, 3, 224, 224)})
    result = graphslim.optimize(model, "fold-bn,conv-group{groups=2}")
    rec = result.report.records[-1]
    assert rec.stats["grouped"] >= 10
    assert all(s.reason for s in rec.skipped)
    grouped = [n for n in result.model.view().nodes() if n.attrs.get("groups") == 2]
    assert len(grouped) == rec.stats["grouped"]


# --- command line and Python API: every bad input is a clear error, never a traceback ---------

def _slim_opt(*args):
    from tests.test_tools import _tool
    return _tool("slim_opt", *args)


@pytest.fixture(scope="module")
def demo_onnx():
    import pathlib
    return pathlib.Path(graphslim.__file__).parent / "data" / "demo_cnn.onnx"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_through_a_link_never_overwrites_the_input(link, demo_onnx, tmp_path):
    """`-o` through a symlink or hard link to the input overwrote it: the same-file check
    compared path strings. Now inodes (os.path.samefile)."""
    import os
    import shutil

    src = tmp_path / "in.onnx"
    shutil.copy(demo_onnx, src)
    before = src.read_bytes()
    alias = tmp_path / "alias.onnx"
    (os.symlink if link == "symlink" else os.link)(src, alias)
    proc = _slim_opt(src, "-o", alias, "-p", "fold-bn")
    assert proc.returncode == 2 and "same file" in proc.stderr, proc.stderr
    assert src.read_bytes() == before


@pytest.mark.parametrize("where,message", [
    ("missing/out.onnx", "does not exist"),
    (".", "is a directory"),
])
def test_bad_output_path_fails_before_work(where, message, demo_onnx, tmp_path):
    proc = _slim_opt(demo_onnx, "-o", tmp_path / where, "-p", "fold-bn")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "ok.onnx"
    proc = _slim_opt(demo_onnx, "-o", out, "-p", "fold-bn", "--json", tmp_path / "no/r.json")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not out.exists()  # refused before any work: nothing half-written


def test_read_only_output_is_refused(demo_onnx, tmp_path):
    import os
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    ro_mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)],
                              capture_output=True)
    if ro_mount.returncode != 0:
        os.chmod(ro, 0o555)
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            pytest.skip("running as root without mount: no read-only place to test")
    try:
        proc = _slim_opt(demo_onnx, "-o", ro / "out.onnx", "-p", "fold-bn")
        assert proc.returncode == 2 and "cannot save to" in proc.stderr, proc.stderr
        assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr
    finally:
        if ro_mount.returncode == 0:
            subprocess.run(["umount", str(ro)])


@pytest.mark.parametrize("args,message", [
    (["-p", "prune-channels(ratio=0.7)"], "takes options in {...}"),
    (["-p", "fold-bn(qdq)"], "only repeat"),
    (["-p", "repeat{max-iter=0}(fold-bn)"], "max-iter must be >= 1"),
    (["-p", "prune-channels"], "nothing to prune"),
    (["-p", "fold-bn", "--seed", "-1"], "seed must be an integer >= 0"),
    (["-p", "fold-bn", "--max-error", "nan"], "max_error must be a finite number"),
    (["-p", "fold-bn", "--max-error", "-1"], "max_error must be a finite number"),
])
def test_bad_pipeline_and_options_exit_2(args, message, demo_onnx, tmp_path):
    proc = _slim_opt(demo_onnx, "-o", tmp_path / "o.onnx", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_python_api_errors_are_graphslim_errors(demo_onnx, tmp_path):
    model = graphslim.load(demo_onnx)
    cases = [
        (lambda: graphslim.load(None), "expected a path"),
        (lambda: graphslim.optimize(str(demo_onnx), "fold-bn"), "graphslim.load(path) first"),
        (lambda: graphslim.optimize(model, 42), "a pipeline is text"),
        (lambda: graphslim.optimize(model, "fold-bn", verify="bogus"), "verify must be"),
        (lambda: graphslim.optimize(model, "fold-bn",
                                    inputs={"image": np.zeros((2, 2), np.float32)}), "rank 4"),
        (lambda: graphslim.optimize(model, "fold-bn",
                                    inputs={"image": np.zeros((1, 1, 9, 9), np.float32)}),
         "does not run on the given inputs"),
        (lambda: model.save(tmp_path / "missing" / "m.onnx"), "does not exist"),
    ]
    for call, message in cases:
        with pytest.raises(graphslim.GraphslimError, match=message.replace("(", r"\(")
                           .replace(")", r"\)")):
            call()


def test_scalar_and_unbatched_inputs_in_data():
    """A voice-activity model's scalar `sr` input (0-d int64) made calibration validation raise
    IndexError; a recurrent state without batch axis could not be given either."""
    from graphslim.data import batches, validate
    from graphslim.frontends.base import TensorSpec

    specs = [TensorSpec("x", (1, 8), np.dtype(np.float32)),
             TensorSpec("state", (2, 1, 4), np.dtype(np.float32)),
             TensorSpec("sr", (), np.dtype(np.int64))]
    data = {"x": np.zeros((5, 8), np.float32), "state": np.ones((5, 2, 1, 4), np.float32),
            "sr": np.array(16000)}
    assert validate(data, specs) == 5
    feeds = list(batches(data, specs))
    assert len(feeds) == 5
    assert feeds[0]["x"].shape == (1, 8) and feeds[0]["state"].shape == (2, 1, 4)
    assert feeds[0]["sr"].shape == () and int(feeds[0]["sr"]) == 16000
    with pytest.raises(graphslim.InputError, match="'state' has shape"):
        validate({**data, "state": np.ones((5, 3), np.float32)}, specs)


def _if_model():
    """conv1 -> relu -> r, read by conv2 and, from the outer scope, inside both branches of an
    If (as the voice-activity model's state handling does)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (16, 3, 3, 3)), ("w2", (4, 16, 1, 1))]]

    def branch(op, name):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node(op, ["r"], [f"{name}_out"], keepdims=0,
                                                   name=f"{name}_reduce")], name, [], [out])

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
             helper.make_node("If", ["flag"], ["z"], name="if",
                              then_branch=branch("ReduceSum", "then"),
                              else_branch=branch("ReduceMax", "else"))]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_readers_block_pruning(tmp_path):
    """Pruning sliced channels an If body also reads (shape inference failed after the pass).
    The view now lists outer values read by subgraphs as inputs of the If node, which the
    channel analysis does not follow: the group is blocked, with the reason."""
    model = graphslim.load(_if_model())
    assert "r" in model.view().node("if").inputs
    result = graphslim.optimize(model, "prune-channels{ratio=0.5}")
    conv1 = result.model.view().param_info("conv1", "weight")[0]
    assert conv1[0] == 16  # unchanged
    assert ("conv1", "if: op If is not modelled by graphslim") in \
        [(s.node, s.reason) for s in result.report.skipped()]
    result.model.save(str(tmp_path / "m.onnx"))


def test_fx_binds_flag_arguments_to_their_defaults():
    """A real trained model's `forward(x, embed=False)` failed to trace (control flow on the
    flag): non-tensor arguments with defaults are bound as constants, as module(x) calls it."""
    import torch
    from torch import nn

    from tests.conftest import randomize_bn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x, embed=False, scale: float = 2.0):
            h = self.bn(self.conv(x)).mean((2, 3)) * scale
            if embed:
                return h
            return self.fc(h)

    net = randomize_bn(Net()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    result = graphslim.optimize(graphslim.trace(net, x), "fold-bn")
    assert result.report.records[-1].verified == "numerical"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.module.modules())
    with torch.no_grad():
        np.testing.assert_allclose(result.model.module(x).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_robustness_matrix_slice(tmp_path):
    """A slice of benchmarks/robustness.py (the full matrix is in
    benchmarks/results/robustness.md): real files x composed pipelines through slim-opt, no
    traceback, no invalid output, no NaN; the lossless ones verified numerically."""
    from graphslim.benchmarks import robustness

    cases = [c for c in robustness.real_files() if c.name.split()[0] in
             ("demo_cnn", "ppocr_cls", "ppocr_v4_det")]
    assert len(cases) == 3
    rows = robustness.matrix(cases, ("fold-bn,equalize", "fold-bn,prune-channels{ratio=0.3},qdq"),
                             str(tmp_path), progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 6, rows
    assert [r["why"] for r in rows[::2]] == ["verified"] * 3


def test_cost_after_qdq_counts_int8_layers(frontend, tmp_path):
    """Params and MACs after qdq were wrong: a real classifier 129k -> 6.3k params (int8 weights
    not counted, per-channel scales counted), MACs 0 (a Conv reading DequantizeLinear was
    opaque), fx params doubled (a parametrized weight's original counted too). Quantizing
    changes neither how many weights there are nor the multiply-adds."""
    import torch
    from torch import nn

    from tests.conftest import make_model, randomize_bn

    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                     nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(32, 10))).eval()
    x = torch.randn(1, 3, 16, 16)
    model = make_model(frontend, net, x, tmp_path)
    calib = {model.input_specs()[0].name: np.random.default_rng(0).standard_normal(
        (8, 3, 16, 16)).astype(np.float32)}
    report = graphslim.optimize(model, "fold-bn,qdq", data=calib).report
    folded, quantized = report.records[0].after, report.records[-1].after
    assert report.records[-1].stats["int8_conv"] == 2
    assert quantized.macs == folded.macs > 0
    assert quantized.params == folded.params > 0
    if frontend == "onnx":
        assert quantized.bytes < folded.bytes / 2  # int8 weights: bytes apart from params


def test_cost_after_qdq_real_ppocr_classifier():
    from graphslim.benchmarks.assets import PPOCR_CLS, text_line_crops

    x, _ = text_line_crops()
    model = graphslim.load(package_file(*PPOCR_CLS), input_shapes={"x": (1, 3, 48, 192)})
    report = graphslim.optimize(model, "fold-bn,qdq", data={"x": x[:16]}).report
    folded, quantized = report.records[0].after, report.records[-1].after
    assert quantized.macs == pytest.approx(folded.macs, rel=0.01)
    assert quantized.params == pytest.approx(folded.params, rel=0.02)
