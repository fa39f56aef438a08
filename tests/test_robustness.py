"""Defects found by running the engine on real files it had never seen (issue 13), each with the
case that showed it. Every test here failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

import graphslim
from graphslim.verify import compare, is_close
from passes.equalize import equalize_pair
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

    from tests.assets import PPOCR_CLS, text_line_crops

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
