"""Cost analysis: MACs and parameters agree between the fx and ONNX views and with torch."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import graphslim
from graphslim.analyses import AnalysisManager
from graphslim.analyses.cost import Cost
from graphslim.benchmarks.assets import export_onnx


def _torch_macs(module, x) -> int:
    # The math SDPA kernel: torch's flop counter does not count the CPU flash-attention kernel.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0",
                                  "maxvit_t", "swin_t"])
def test_cost_matches_torch_and_between_frontends(name, tmp_path):
    torch.manual_seed(0)
    module = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():  # distinct values, so the exporter cannot merge equal initializers
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    x = torch.randn(1, 3, 224, 224)
    fx_cost = AnalysisManager(graphslim.trace(module, x)).get(Cost)
    onnx_cost = AnalysisManager(graphslim.load(export_onnx(module, x, tmp_path / "m.onnx"))
                                ).get(Cost)
    ref_macs = _torch_macs(module, x)
    ref_params = sum(p.numel() for p in module.parameters())
    print(f"{name}: MACs torch {ref_macs} fx {fx_cost.macs} onnx {onnx_cost.macs}; "
          f"params torch {ref_params} fx {fx_cost.params} onnx {onnx_cost.params}")
    assert fx_cost.params == onnx_cost.params == ref_params
    assert abs(fx_cost.macs - ref_macs) <= 0.01 * ref_macs
    assert abs(onnx_cost.macs - fx_cost.macs) <= 0.001 * fx_cost.macs


def test_cost_per_node_conv_formula(tmp_path):
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
    model = graphslim.trace(torch.nn.Sequential(conv), torch.randn(2, 8, 10, 10))
    cost = AnalysisManager(model).get(Cost)
    # out 2x16x5x5, each output reads (8/2) x 3 x 3 inputs
    assert cost.macs == 2 * 16 * 5 * 5 * 4 * 9
    assert cost.params == 16 * 4 * 9 + 16
