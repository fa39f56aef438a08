"""fold-bn on real architectures (torchvision, both frontends) and on a real trained ONNX file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision

import graphslim
from graphslim.benchmarks.assets import PPOCR_CLS, text_line_crops
from graphslim.runtime import make_session
from tests.conftest import (
    FP32,
    assert_matches_torch,
    count_ops,
    make_model,
    package_file,
    randomize_bn,
)

# model -> BatchNorms that legitimately stay: densenet's pre-activation BNs sit on a concat whose
# inputs feed other concats too, and are followed by ReLU.
MODELS = {"resnet18": 0, "mobilenet_v3_small": 0, "densenet121": 62, "maxvit_t": 0}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_bn_torchvision(name, frontend, tmp_path):
    torch.manual_seed(0)
    module = randomize_bn(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(1, 3, 224, 224)
    model = make_model(frontend, module, x, tmp_path, name)
    before = count_ops(model, "BatchNorm")
    result = graphslim.optimize(model, "fold-bn", tolerance=FP32)
    left = count_ops(result.model, "BatchNorm")
    assert left == MODELS[name], result.report.table()
    assert len(result.report.skipped()) == left and before > left
    for skip in result.report.skipped():
        assert "backward:" in skip.reason and "forward:" in skip.reason
    assert_matches_torch(result.model, module, x, FP32)


def test_fold_bn_ppocr_angle_classifier(tmp_path):
    """PaddleOCR's text-angle classifier (paddle2onnx, weights in Constant nodes, 35 BNs): all
    folded, checker-valid, loads in ORT, and the predictions on real text lines are unchanged."""
    path = package_file(*PPOCR_CLS)
    model = graphslim.load(path, input_shapes={"x": (1, 3, 48, 192)})
    assert count_ops(model, "BatchNormalization") == 35
    result = graphslim.optimize(model, "fold-bn", tolerance=FP32)
    assert count_ops(result.model, "BatchNormalization") == 0
    out = tmp_path / "cls_folded.onnx"
    result.model.save(str(out))
    onnx.checker.check_model(str(out), full_check=True)

    x, labels = text_line_crops()
    before = make_session(path).run(None, {"x": x})[0]
    after = make_session(str(out)).run(None, {"x": x})[0]
    acc_before = float((before.argmax(1) == labels).mean())
    acc_after = float((after.argmax(1) == labels).mean())
    print(f"PP-OCR angle classifier on {len(labels)} real text crops: accuracy {acc_before:.3f} "
          f"before, {acc_after:.3f} after fold-bn; max |prob diff| "
          f"{np.abs(before - after).max():.2e}")
    assert acc_before > 0.85, "the real-data check itself must be meaningful"
    np.testing.assert_array_equal(before.argmax(1), after.argmax(1))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
