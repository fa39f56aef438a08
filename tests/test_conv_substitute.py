"""conv-substitute: exact rewrites (block-diagonal -> grouped/depthwise, merge linear pairs) on
both frontends, and on a real architecture whose grouped convs were expanded to dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import graphslim
from graphslim.benchmarks.models import expand_groups
from graphslim.passes import conv_math as cm
from tests.conftest import FP32, assert_matches_torch, make_model


def _block_diag(conv: nn.Conv2d, groups: int) -> nn.Conv2d:
    n, c = conv.weight.shape[:2]
    rows = torch.arange(n)[:, None] // (n // groups)
    mask = rows == torch.arange(c)[None, :] // (c // groups)
    with torch.no_grad():
        conv.weight.mul_(mask[:, :, None, None])
    return conv


def _groups_after(model) -> list[int]:
    return sorted(n.attrs["groups"] for n in model.view().nodes() if n.kind.value == "conv")


@pytest.mark.parametrize("cin,cout,groups", [(8, 12, 4), (8, 16, 8), (6, 6, 6)])
def test_block_diagonal_becomes_grouped(cin, cout, groups, frontend, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(_block_diag(nn.Conv2d(cin, cout, 3, padding=1), groups),
                           nn.ReLU()).eval()
    x = torch.randn(2, cin, 9, 9)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "conv-substitute{rewrites=grouped}", tolerance=FP32)
    assert _groups_after(result.model) == [groups]
    assert result.report.final.macs * groups == result.report.original.macs
    assert_matches_torch(result.model, module, x, FP32)


def test_dense_conv_is_left_alone(frontend, tmp_path):
    module = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 8, 7, 7)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "conv-substitute{rewrites=grouped}")
    assert result.report.records[0].edits == 0


def test_resnext_expanded_groups_are_restored(frontend, tmp_path):
    torch.manual_seed(0)
    module = torchvision.models.resnext50_32x4d().eval()
    assert expand_groups(module) == 16
    x = torch.randn(1, 3, 64, 64)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "conv-substitute{rewrites=grouped}", tolerance=FP32)
    assert _groups_after(result.model).count(32) == 16
    print(f"resnext50 with expanded groups: MACs {result.report.original.macs / 1e6:.0f}M -> "
          f"{result.report.final.macs / 1e6:.0f}M")
    assert_matches_torch(result.model, module, x, FP32)


class Pairs(nn.Module):
    """Conv -> 1x1 conv (expanding: merges) and Linear -> Linear (merges)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.point = nn.Conv2d(32, 8, 1)
        self.fc1, self.fc2 = nn.Linear(8 * 36, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(self.fc1(torch.flatten(self.point(self.conv(x)), 1)))


def test_merge_linear_pairs(frontend, tmp_path):
    torch.manual_seed(0)
    module = Pairs().eval()
    x = torch.randn(2, 3, 6, 6)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "conv-substitute{rewrites=merge}", tolerance=FP32)
    rec = result.report.records[0]
    assert rec.stats["merged"] == 2 and result.report.final.macs < result.report.original.macs
    layers = [n for n in result.model.view().nodes() if n.kind.value in ("conv", "linear")]
    assert len(layers) == 2
    assert_matches_torch(result.model, module, x, FP32)


def test_merge_skips_a_bottleneck(frontend, tmp_path):
    module = nn.Sequential(nn.Conv2d(64, 8, 1), nn.Conv2d(8, 64, 1)).eval()
    x = torch.randn(1, 64, 5, 5)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "conv-substitute{rewrites=merge}")
    assert result.report.records[0].edits == 0
    assert "not cheaper" in result.report.skipped()[0].reason


def test_conv_math_block_detection():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 8, 3, 3))
    assert cm.block_groups(w) == 1
    mask = (np.arange(12)[:, None] // 3) == (np.arange(8)[None, :] // 2)
    wb = w * mask[:, :, None, None]
    assert cm.block_groups(wb) == 4 and cm.off_block_mass(wb, 4) == 0.0
    grouped = cm.to_grouped(wb, 4)
    assert grouped.shape == (12, 2, 3, 3)
    np.testing.assert_array_equal(grouped[3:6], wb[3:6, 2:4])


def test_bad_rewrite_name():
    with pytest.raises(graphslim.PipelineError, match="rewrites must be"):
        graphslim.parse_pipeline("conv-substitute{rewrites=grouped;fancy}")


def test_separable_exact_at_full_multiplier(frontend, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 8, 9, 9)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "conv-separable{multiplier=9,min-saving=-10}")
    assert result.report.records[0].details[0]["weight_rel_error"] < 1e-9
    assert sorted(_groups_after(result.model)) == [1, 8]
    assert_matches_torch(result.model, module, x, FP32)


def test_separable_error_falls_with_multiplier():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval()
    model = graphslim.trace(module, torch.randn(1, 16, 12, 12))
    errors = []
    for m in (1, 2, 4, 9):
        result = graphslim.optimize(model, f"conv-separable{{multiplier={m},min-saving=-10}}")
        errors.append((result.report.records[0].details[0]["weight_rel_error"],
                       result.report.records[0].error_orig.rel_l2))
    print("separable (weight, output) errors by multiplier 1, 2, 4, 9:", errors)
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(errors, errors[1:]))


def test_separable_budget_skips_with_reason(frontend, tmp_path):
    module = nn.Sequential(nn.Conv2d(8, 16, 3)).eval()
    model = make_model(frontend, module, torch.randn(1, 8, 9, 9), tmp_path)
    result = graphslim.optimize(model, "conv-separable{max-error=0.01}")
    assert result.report.records[0].edits == 0
    assert "above max-error" in result.report.skipped()[0].reason


def test_separable_mnist_accuracy_after_finetune():
    from graphslim.benchmarks import mnist_cnn
    net = mnist_cnn.trained()
    base = mnist_cnn.accuracy(net)
    result = graphslim.optimize(graphslim.trace(net, mnist_cnn.example()),
                                "conv-separable{multiplier=2}")
    slim = result.model.module
    raw = mnist_cnn.accuracy(slim)
    tuned = mnist_cnn.accuracy(mnist_cnn.train(slim, epochs=1, lr=1e-3))
    macs = result.report.final.macs / result.report.original.macs
    print(f"MNIST CNN depthwise-separable (m=2): MACs x{macs:.2f}; top-1 {base:.3f} -> {raw:.3f} "
          f"-> {tuned:.3f} after 1 epoch fine-tuning")
    assert macs < 0.5 and tuned > raw and tuned >= base - 0.02
