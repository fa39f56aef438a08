"""smooth-quant (passes/smooth_quant.py): exact on both frontends, scales only what the linear
layers read (the residual keeps the unscaled value), and lowers int8 error where one feature
channel dominates. The real-model figure (all-MiniLM-L6-v2) is in tests/test_qdq_real.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphslim
from graphslim.passes.smooth_quant import smoothing_scales
from tests.conftest import assert_matches_torch, make_model


class PostLN(nn.Module):
    """A post-LN transformer block's linear structure: the LayerNorm output feeds two linears
    and the residual; an FFN behind a GELU. Feature 3 of the LayerNorm is an outlier (x30)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.ln = nn.Linear(16, 32), nn.LayerNorm(32)
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        with torch.no_grad():
            self.ln.weight[3] = 30.0

    def forward(self, x):
        h = self.ln(self.inp(x))
        h2 = h + self.q(h) * 0.5 + self.k(h)
        return h2 + self.down(nn.functional.gelu(self.up(h2)))


def _data(name: str, seed: int) -> dict:
    return {name: np.random.default_rng(seed).standard_normal((64, 8, 16)).astype(np.float32)}


def test_smoothing_is_exact_and_scales_only_the_linear_readers(frontend, tmp_path):
    module = PostLN().eval()
    example = torch.randn(2, 8, 16)
    model = make_model(frontend, module, example, tmp_path)
    name = model.input_specs()[0].name
    res = graphslim.optimize(model, "smooth-quant", data=_data(name, 0))
    (rec,) = res.report.records
    assert rec.verified == "numerical" and rec.nodes_changed
    # four activations: the input (inp), the LayerNorm output (q, k), the residual sum (up),
    # the GELU (down)
    assert rec.stats["activations"] == 4 and rec.stats["layers"] == 5
    assert any("peak / median peak up to" in n for n in rec.notes)
    assert_matches_torch(res.model, module, example)
    muls = [n for n in res.model.view().nodes() if n.kind.name == "MUL"]
    assert len(muls) == len([n for n in model.view().nodes() if n.kind.name == "MUL"]) + 4
    if frontend == "fx":  # still the user's trainable module: the scales are buffers
        buffers = [k for k, _ in res.model.module.named_buffers() if k.startswith("smooth_")]
        assert len(buffers) == 4


def test_smoothing_lowers_the_int8_error_of_an_outlier_channel(tmp_path):
    module = PostLN().eval()
    model = make_model("onnx", module, torch.randn(2, 8, 16), tmp_path)
    name = model.input_specs()[0].name
    calib, evaluation = _data(name, 0), _data(name, 1)  # disjoint draws

    def outputs(m) -> np.ndarray:  # the export has a fixed batch of 2
        x = evaluation[name]
        return np.concatenate([next(iter(m.run({name: x[i:i + 2]}).values()))
                               for i in range(0, len(x), 2)])

    ref = outputs(model)
    errors = {}
    for text in ("qdq{ops=linear}", "smooth-quant,qdq{ops=linear}"):
        got = outputs(graphslim.optimize(model, text, data=calib).model)
        errors[text] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"\nrel L2 on held-out inputs: {errors}")
    assert errors["smooth-quant,qdq{ops=linear}"] < 0.7 * errors["qdq{ops=linear}"]


def test_scales_formula_and_bounds():
    s = smoothing_scales(np.array([4.0, 0.0, 1.0, 1e12]), np.array([1.0, 2.0, 0.0, 1e-12]), 0.5)
    np.testing.assert_allclose(s[:3], [2.0, 1.0, 1.0])
    assert s[3] == 1e4  # bounded
    np.testing.assert_allclose(smoothing_scales(np.array([8.0]), np.array([2.0]), 1.0), [8.0])
    with pytest.raises(graphslim.PipelineError, match=r"alpha must be in \[0, 1\]"):
        graphslim.parse_pipeline("smooth-quant{alpha=1.5}")
