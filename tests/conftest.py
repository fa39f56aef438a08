"""Shared test helpers: real torch modules exported to real ONNX files, both frontends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import graphslim  # noqa: E402
from graphslim.benchmarks.assets import export_onnx, require  # noqa: E402

FP32 = graphslim.Tolerance(rtol=1e-4, atol=1e-5)


def randomize_bn(module, seed: int = 0, negative_scales: bool = True):
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh init is nearly the
    identity, which would make a folding test prove little)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
            if m.affine:
                sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0) \
                    if negative_scales else 1.0
                m.weight.data.copy_((torch.rand(c, generator=g) + 0.5) * sign)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return module


def make_model(frontend: str, module, example, tmp_path, name="model"):
    """The module as a graphslim model on the given frontend ('fx' or 'onnx')."""
    if frontend == "fx":
        return graphslim.trace(module, example)
    return graphslim.load(export_onnx(module, example, tmp_path / f"{name}.onnx"))


def torch_outputs(module, example) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*(example if isinstance(example, tuple) else (example,)))
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in outs]


def assert_matches_torch(result_model, module_ref, example, tol=FP32):
    """The optimized model's outputs against the *original torch module* (independent of the
    pass manager's own check), within `tol`."""
    args = example if isinstance(example, tuple) else (example,)
    specs = result_model.input_specs()
    feeds = {s.name: a.numpy() for s, a in zip(specs, args)}
    got = list(result_model.run(feeds).values())
    ref = torch_outputs(module_ref, example)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=tol.rtol, atol=tol.atol)


def count_ops(model, op_substring: str) -> int:
    return sum(1 for n in model.view().nodes() if op_substring in n.op)


@pytest.fixture(params=["fx", "onnx"])
def frontend(request):
    return request.param


def package_file(package: str, relpath: str) -> str:
    """A data file inside an installed package; the test is skipped (AssetMissing is a
    unittest.SkipTest) when the asset package is not installed."""
    return require(package, relpath)
