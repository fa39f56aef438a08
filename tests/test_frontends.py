"""Frontend behaviour: tracing fallbacks, ONNX normalization, metadata, external data, runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphslim
from graphslim.benchmarks.assets import export_onnx
from graphslim.frontends import onnx as onnx_frontend
from graphslim.runtime import available_providers, make_session
from tests.conftest import count_ops, randomize_bn


class DataDependent(nn.Module):
    """Python control flow on tensor values: symbolic tracing cannot go through it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.odd = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), DataDependent()

    def forward(self, x):
        return self.odd(self.bn(self.conv(x)))


def test_fx_untraceable_submodule_becomes_opaque_leaf():
    module = randomize_bn(Net()).eval()
    x = torch.randn(1, 3, 8, 8)
    model = graphslim.trace(module, x)
    assert "opaque leaves: odd" in model.traced_with
    odd = next(n for n in model.view().nodes() if n.attrs.get("module") == "odd")
    assert odd.kind.value == "opaque" and "DataDependent" in odd.attrs["reason"]
    result = graphslim.optimize(model, "fold-bn")
    assert count_ops(result.model, "BatchNorm") == 0
    with torch.no_grad():
        np.testing.assert_allclose(result.model.module(x), module(x), rtol=1e-4, atol=1e-5)


def test_fx_untraceable_top_level_is_a_clear_error():
    with pytest.raises(graphslim.InputError, match="cannot trace DataDependent"):
        graphslim.trace(DataDependent(), torch.randn(2))


def _export(tmp_path):
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    return module, export_onnx(module, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")


def test_onnx_keeps_opset_metadata_and_output_names(tmp_path):
    _, path = _export(tmp_path)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {"author": "test", "license": "MIT"})
    proto.doc_string = "a model"
    out_name = proto.graph.output[0].name
    result = graphslim.optimize(graphslim.load(proto), "fold-bn")
    emitted = result.model.to_proto()
    assert [(o.domain, o.version) for o in emitted.opset_import] == \
        [(o.domain, o.version) for o in proto.opset_import]
    assert {p.key: p.value for p in emitted.metadata_props} == {"author": "test", "license": "MIT"}
    assert emitted.doc_string == "a model" and emitted.producer_name == proto.producer_name
    assert [o.name for o in emitted.graph.output] == [out_name]


def test_onnx_bypass_of_a_graph_output_keeps_its_name(tmp_path):
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    path = export_onnx(module, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", )
    model = graphslim.load(path)
    name = model.view().outputs[0]
    result = graphslim.optimize(model, "fold-bn")
    assert result.model.view().outputs == (name,)
    assert result.model.view().producer(name).op == "Conv"


def test_onnx_external_data_path(tmp_path, monkeypatch):
    """Models over 2 GB go through files with external data; the threshold is lowered here so
    the same code path runs on a small model."""
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU()))
    path = export_onnx(module, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_frontend, "_LARGE_BYTES", 100)
    model = graphslim.load(path)
    assert model.is_large()
    result = graphslim.optimize(model, "fold-bn")
    out = tmp_path / "big.onnx"
    result.model.save(str(out))
    assert (tmp_path / "big.onnx.data").exists()
    reloaded = graphslim.load(str(out))
    assert count_ops(reloaded, "BatchNorm") == 0
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(list(reloaded.run({"x": x}).values())[0], ref, rtol=1e-4,
                               atol=1e-5)


def test_runtime_providers_and_optimized_graph(tmp_path):
    _, path = _export(tmp_path)
    optimized = tmp_path / "ort_optimized.onnx"
    make_session(path, "cpu", "all", threads=1, optimized_model_path=str(optimized))
    assert onnx.load(str(optimized)).graph.node  # ORT's own optimized graph, for inspection
    if "cuda" in available_providers():
        sess = make_session(path, "cuda")
        assert sess.get_providers()[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(RuntimeError, match="'cuda' is not available"):
            make_session(path, "cuda")
    with pytest.raises(ValueError, match="opt_level"):
        make_session(path, opt_level="max")
