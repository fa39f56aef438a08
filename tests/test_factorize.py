"""factorize: exact at full rank on both frontends, error falls with rank, real accuracy kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import graphslim
from graphslim.benchmarks import mnist_cnn
from graphslim.passes import lowrank_math as lr
from tests.conftest import FP32, assert_matches_torch, count_ops, make_model

FULL = "force=true,round-to=1,rank=1.0"


@pytest.mark.parametrize("method,expected", [("tucker2", 17), ("spatial-svd", 17), ("svd", 4)])
def test_full_rank_is_exact_resnet18(method, expected, frontend, tmp_path):
    """resnet18 has 17 KxK convs, three 1x1 downsample convs and one Linear."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, f"factorize{{method={method},{FULL}}}")
    assert result.report.records[0].edits == expected
    assert_matches_torch(result.model, module, x, FP32)


@pytest.mark.slow  # 68 s for both frontends; resnet18 full-rank exactness stays in make test
@pytest.mark.parametrize("big_fc", [pytest.param(True, marks=pytest.mark.slow), False])
def test_full_rank_is_exact_vgg16(big_fc, frontend, tmp_path):
    """VGG16: Tucker-2 on the 13 3x3 convs, SVD on the FC layers. Full-rank SVD of the
    4096 x 25088 fc6 and 4096 x 4096 fc7 takes ~30 s on 2 cores: in the slow set only."""
    torch.manual_seed(0)
    module = torchvision.models.vgg16().eval()
    x = torch.randn(1, 3, 224, 224)
    model = make_model(frontend, module, x, tmp_path)
    skip_fc = "" if big_fc else ",exclude=*classifier?0*;*classifier?3*"
    result = graphslim.optimize(model, f"factorize{{method=auto,{FULL}{skip_fc}}}")
    methods = [d["method"] for d in result.report.records[0].details]
    assert len(methods) == 13 + methods.count("svd") and methods.count("svd") == (3 if big_fc
                                                                                 else 1)
    assert_matches_torch(result.model, module, x, FP32)


class Block(nn.Module):
    """Pre-norm transformer block (ViT style)."""

    def __init__(self, dim=64, heads=4, hidden=256):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    """A small Linear-heavy transformer: embedding, two blocks and a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def test_full_rank_is_exact_transformer(frontend, tmp_path):
    torch.manual_seed(0)
    module = Encoder().eval()
    x = torch.randn(2, 12, 16)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, f"factorize{{method=svd,{FULL}}}")
    # fx: embed, head and 2 x (fc1, fc2); attention stays inside nn.MultiheadAttention.
    # ONNX: the exported attention projections are MatMuls with constant weights too.
    assert result.report.records[0].edits >= 6
    assert_matches_torch(result.model, module, x, FP32)


@pytest.mark.parametrize("method", ["svd", "tucker2", "spatial-svd", "cp"])
def test_error_falls_as_rank_rises(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1 if method == "svd" else 3, padding=0 if method == "svd" else 1)
    module = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(2, 16, 12, 12)
    model = graphslim.trace(module, x)
    weight_errors, output_errors = [], []
    for rank in (0.125, 0.25, 0.5, 0.75, 1.0):
        result = graphslim.optimize(model, f"factorize{{method={method},rank={rank},"
                                           "force=true,round-to=1}")
        rec = result.report.records[0]
        weight_errors.append(rec.details[0]["weight_rel_error"])
        output_errors.append(rec.error_orig.rel_l2)
    print(method, "weight errors", weight_errors, "output errors", output_errors)
    assert all(a > b for a, b in zip(weight_errors, weight_errors[1:]))
    assert all(a > b for a, b in zip(output_errors, output_errors[1:]))
    if method != "cp":  # CP has no finite full rank: it only improves
        assert weight_errors[-1] < 1e-6


def test_skips_with_reasons(frontend, tmp_path):
    module = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 8, 10, 10)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "factorize{method=tucker2,rank=1.0}")
    reasons = sorted(s.reason for s in result.report.skipped())
    assert result.report.records[0].edits == 0 and len(reasons) == 2
    assert "grouped conv (groups=4)" in reasons[0] and "saves less than 10%" in reasons[1]


@pytest.mark.parametrize("text,message", [
    ("factorize{method=qr}", "method must be one of"),
    ("factorize{rank=0}", "rank must be > 0"),
    ("factorize{energy=1.5}", "energy must be in"),
    ("factorize{target-macs=1.2}", "target-macs must be in"),
    ("factorize{layers=attention}", "layers must be"),
])
def test_bad_options(text, message):
    with pytest.raises(graphslim.PipelineError, match=message):
        graphslim.parse_pipeline(text)


@pytest.mark.parametrize("frontend", ["onnx"])  # the rank math is the frontends' common code:
def test_budget_meets_target_macs(frontend, tmp_path):  # 26 s each; exactness covers both
    torch.manual_seed(0)
    module = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "factorize{target-macs=0.6}")
    before, after = result.report.original.macs, result.report.final.macs
    assert after <= 0.6 * before and after >= 0.3 * before, (before, after)


def test_rank_selection_rules():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((64, 8)) @ rng.standard_normal((8, 200))
    noisy = low + 0.05 * rng.standard_normal(low.shape)
    assert lr.evbmf_rank(noisy) == 8
    s = lr.singular_values(noisy)
    assert lr.energy_rank(s, 0.99) <= 8 and lr.energy_rank(s, 1.0) == 64
    assert lr.round_rank(9, 64, 8) == 16 and lr.round_rank(70, 64, 8) == 64


def test_gram_svd_matches_lapack():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((1100, 1500))
    u, s, vt = lr.svd(m, 50)
    ref = np.linalg.svd(m, compute_uv=False)[:50]
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(u * (m @ vt.T), 0)), ref, rtol=1e-9)


def test_mnist_cnn_half_macs_keeps_accuracy():
    """Trained on real digits, factorized to at most half its MACs, fine-tuned one epoch: the
    top-1 drop is at most 1 point."""
    net = mnist_cnn.trained()
    base = mnist_cnn.accuracy(net)
    model = graphslim.trace(net, mnist_cnn.example())
    result = graphslim.optimize(model, "factorize{target-macs=0.5}")
    macs = result.report.final.macs / result.report.original.macs
    slim = result.model.module
    raw = mnist_cnn.accuracy(slim)
    tuned = mnist_cnn.accuracy(mnist_cnn.train(slim, epochs=1, lr=5e-4))
    print(f"MNIST CNN: MACs x{macs:.2f}; top-1 {base:.3f} -> {raw:.3f} factorized -> "
          f"{tuned:.3f} after 1 epoch fine-tuning")
    assert macs <= 0.5 and count_ops(result.model, "Conv") > 4
    assert tuned >= base - 0.01


def test_measure_times_layer_and_chain(frontend, tmp_path):
    """measure=true times each layer and its chain alone on ORT before replacing it (which one
    wins on small layers is the machine's business, not a unit test's: a 16x MAC cut on a
    2048-wide layer is what must go through)."""
    module = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()).eval()
    x = torch.randn(64, 2048)
    model = make_model(frontend, module, x, tmp_path)
    result = graphslim.optimize(model, "factorize{method=svd,rank=64,measure=true}")
    rec = result.report.records[0]
    assert len(rec.details) == 1 and rec.details[0]["macs_after"] * 8 < rec.details[0][
        "macs_before"]
    from graphslim.edits import Layer
    from graphslim.ir import OpKind
    from graphslim.sites import measure_chain
    w = np.random.default_rng(0).standard_normal((32, 16))
    before, after = measure_chain((Layer(OpKind.LINEAR, w),),
                                  (Layer(OpKind.LINEAR, w[:8]), Layer(OpKind.LINEAR, w[:, :8])),
                                  (4, 16), repeats=5)
    # at least `repeats` calls, more for a site this small (about 0.1 s of timing per side)
    assert before.samples == after.samples > 5 and before.median > 0 and after.median > 0


def test_hooi_refines_hosvd(frontend, tmp_path):
    """hooi-iters > 0 refines the one-shot HOSVD: weight error no worse, outputs still valid."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 16, 10, 10)
    model = make_model(frontend, module, x, tmp_path)
    errors = []
    for iters in (0, 10):
        result = graphslim.optimize(model, f"factorize{{method=tucker2,rank=0.25,force=true,"
                                           f"hooi-iters={iters}}}")
        errors.append(result.report.records[0].details[0]["weight_rel_error"])
    print("Tucker-2 weight error HOSVD, HOOI(10):", errors)
    assert errors[1] <= errors[0] + 1e-9 and errors[0] > 0.1
