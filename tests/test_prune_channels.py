"""prune-channels and ChannelDeps on both frontends.

The decisive test (Torch-Pruning's own check, made stricter): make a random share of every exact
group's channels dead (every producer row and consumer column zero), prune exactly those, and
the outputs must not move (rtol 1e-4, atol 1e-5 x max(1, max |reference|)). A missed coupling
fails on a shape mismatch or a changed output; a wrong coupling (pruning the wrong index) changes
the output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import graphslim
from graphslim.analyses.channels import build_channel_deps
from graphslim.analyses.cost import compute_cost
from graphslim.benchmarks import mnist_cnn
from graphslim.verify import make_inputs
from tests.conftest import make_model, randomize_bn
from tests.prune_helpers import prune_dead_and_compare

RTOL, ATOL = 1e-4, 1e-5

QUICK = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "regnet_y_400mf",
         "efficientnet_b0", "googlenet", "densenet121"]
SLOW = ["resnet50", "mobilenet_v2", "inception_v3", "convnext_tiny", "vit_b_16", "swin_t"]


def _torchvision(name: str, size: int):
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                  "inception_v3") else {}
    torch.manual_seed(0)
    m = randomize_bn(getattr(torchvision.models, name)(**kw)).eval()
    if hasattr(m, "heads"):  # vit's head starts at zero: outputs would compare nothing
        nn.init.normal_(m.heads.head.weight, std=0.02)
    return m, torch.randn(1, 3, size, size)


def _assert_exact(model, heads=False):
    ref, got, deps, n_removed, pruned = prune_dead_and_compare(model, 0.3, heads=heads)
    assert n_removed > 0
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(r).max())))
        assert np.abs(r).max() > 1e-3  # the comparison is not of zeros
    before = compute_cost(model.view(), model.infer_shapes()).macs
    after = compute_cost(pruned.view(), pruned.infer_shapes()).macs
    assert after < before
    return deps


@pytest.mark.parametrize("name", QUICK)
def test_dead_channels_prune_exactly(name, frontend, tmp_path):
    size = 96 if name != "googlenet" else 128
    module, x = _torchvision(name, size)
    deps = _assert_exact(make_model(frontend, module, x, tmp_path, name))
    assert len(deps.prunable) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_dead_channels_prune_exactly_large(name, frontend, tmp_path):
    size = 299 if name == "inception_v3" else 224
    module, x = _torchvision(name, size)
    model = make_model(frontend, module, x, tmp_path, name)
    _assert_exact(model, heads=name == "vit_b_16")
    if name == "vit_b_16":
        _assert_exact(model, heads=False)


def test_vit_heads_and_head_dims(frontend, tmp_path):
    """A 2-layer ViT: whole heads (heads=true) and uniform head dims prune exactly; with heads
    a unit is a head, without them a head dim (of every head)."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=4, hidden_dim=64, mlp_dim=128,
                                               num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.2)
    x = torch.randn(1, 3, 32, 32)
    model = make_model(frontend, vit, x, tmp_path, "vit")
    _assert_exact(model, heads=True)
    _assert_exact(model, heads=False)
    deps = build_channel_deps(model.view(), model.infer_shapes(), heads=True)
    sizes = sorted(g.size for g in deps.prunable if not g.inexact)
    assert sizes[:2] == [4, 4]  # two attention layers, one unit per head
    plain = build_channel_deps(model.view(), model.infer_shapes(), heads=False)
    head_dims = [g for g in plain.prunable if g.size == 16]
    assert len(head_dims) == 2
    if frontend == "onnx":  # the exported sdpa computes 1/sqrt(head_dim) from the shape
        assert all("float math" in g.inexact[0] for g in head_dims)
    else:  # SlimMultiheadAttention keeps the original scale
        assert not any(g.inexact for g in head_dims)


def _pipeline(model, text, **kw):
    return graphslim.PassManager(text, **kw).run(model)


def test_ratio_rounds_channels_and_cuts_macs(frontend, tmp_path):
    module, x = _torchvision("mobilenet_v2", 64)
    model = make_model(frontend, module, x, tmp_path, "mbv2")
    res = _pipeline(model, "prune-channels{ratio=0.5,round-to=8}")
    out = res.model
    view = out.view()
    for n in view.nodes():
        if n.kind.value == "conv":
            w, _ = view.param_info(n.name, "weight")
            assert w[0] % 8 == 0, (n.name, w)
    cost = compute_cost(view, out.infer_shapes())
    orig = compute_cost(model.view(), model.infer_shapes())
    assert cost.macs < 0.45 * orig.macs
    outs = out.run(make_inputs(out.input_specs()))
    assert next(iter(outs.values())).shape == (1, 1000)


def test_target_macs_is_met(frontend, tmp_path):
    module, x = _torchvision("resnet18", 64)
    model = make_model(frontend, module, x, tmp_path, "r18")
    res = _pipeline(model, "prune-channels{target-macs=0.4,scope=global}")
    orig = compute_cost(model.view(), model.infer_shapes()).macs
    got = compute_cost(res.model.view(), res.model.infer_shapes()).macs
    assert 0.25 * orig < got <= 0.42 * orig


def test_unknown_op_blocks_its_group(tmp_path):
    """PixelShuffle mixes channels into space: Torch-Pruning treats it as channel-preserving
    and prunes wrongly; graphslim blocks the group and says why."""
    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2),
                           nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
    model = graphslim.trace(module.eval(), torch.randn(1, 3, 8, 8))
    deps = build_channel_deps(model.view(), model.infer_shapes())
    blocked = [g for g in deps.groups if not g.prunable]
    assert any("PixelShuffle" in r for g in blocked for r in g.blocked)
    res = _pipeline(model, "prune-channels{ratio=0.5,min-channels=1,round-to=1}")
    first = res.model.view().param_info("_0", "weight")[0]
    assert first[0] == 16
    assert any("PixelShuffle" in s.reason for s in res.report.skipped())


def test_bad_options_and_targets(tmp_path):
    with pytest.raises(graphslim.PipelineError, match="ratio"):
        graphslim.parse_pipeline("prune-channels{ratio=1.0}")
    with pytest.raises(graphslim.PipelineError, match="criterion"):
        graphslim.parse_pipeline("prune-channels{ratio=0.3,criterion=magic}")
    with pytest.raises(graphslim.PipelineError, match="one of"):
        graphslim.parse_pipeline("prune-channels{ratio=0.3,target-macs=0.5}")
    module, x = _torchvision("resnet18", 64)
    model = graphslim.trace(module, x)
    with pytest.raises(graphslim.PassError, match="cannot be met"):
        _pipeline(model, "prune-channels{target-macs=0.001}")
    res = _pipeline(model, "prune-channels{ratio=0.25,exclude=nothing_*}")
    assert any("matched no node" in n for n in res.report.records[0].notes)
    bad = {"x": np.zeros((2, 3, 64, 64), np.float32), "labels": np.arange(3)}
    with pytest.raises(graphslim.GraphslimError, match="3 entries for 2 samples"):
        graphslim.PassManager("prune-channels{ratio=0.25,criterion=taylor}").run(model, data=bad)


def test_pruned_torch_module_is_the_users_and_trains():
    module, x = _torchvision("resnet18", 64)
    model = graphslim.trace(module, x)
    res = _pipeline(model, "prune-channels{ratio=0.5}")
    pruned = res.model.module
    assert isinstance(pruned, torchvision.models.ResNet)
    assert pruned.layer1[0].conv1.out_channels == 32
    pruned.train()
    loss = pruned(torch.randn(2, 3, 64, 64)).square().mean()
    loss.backward()
    assert pruned.conv1.weight.grad.shape == pruned.conv1.weight.shape


@pytest.mark.parametrize("criterion", ["taylor", "l1"])
def test_mnist_accuracy_after_pruning_half_the_macs(criterion):
    """Real digits: a CNN trained here, pruned to half its MACs, fine-tuned one epoch, loses at
    most 1 point of top-1 against the unpruned model."""
    base = mnist_cnn.trained()
    acc0 = mnist_cnn.accuracy(base)
    (xtr, ytr), _ = mnist_cnn.data()
    model = graphslim.trace(base, mnist_cnn.example())
    name = model.input_specs()[0].name
    data = {name: xtr[:512], "labels": ytr[:512]}
    res = graphslim.PassManager(f"prune-channels{{target-macs=0.5,criterion={criterion},"
                                "round-to=8}",
                                verify="end").run(model, data=data)
    pruned = res.model.module
    macs = [res.report.original.macs, res.report.final.macs]
    acc1 = mnist_cnn.accuracy(pruned)
    mnist_cnn.train(pruned, epochs=1, lr=1e-3, seed=1)
    acc2 = mnist_cnn.accuracy(pruned)
    print(f"\nMNIST-5k {criterion}: MACs {macs[0]} -> {macs[-1]} ({macs[-1] / macs[0]:.2f}x), "
          f"top-1 {acc0:.3f} -> pruned {acc1:.3f} -> fine-tuned 1 epoch {acc2:.3f}")
    assert macs[-1] <= 0.5 * macs[0]
    assert acc2 >= acc0 - 0.01


@pytest.mark.slow  # 63 s of fine-tuning; make test-all
def test_iterative_schedule_with_fine_tuning():
    """Three rounds of prune (taylor) + a short fine-tune reach half the MACs; the callback sees
    the pruned model each round."""
    from graphslim.schedule import prune_iteratively

    base = mnist_cnn.trained()
    acc0 = mnist_cnn.accuracy(base)
    (xtr, ytr), _ = mnist_cnn.data()
    model = graphslim.trace(base, mnist_cnn.example())
    data = {model.input_specs()[0].name: xtr[:256], "labels": ytr[:256]}
    seen = []

    def finetune(m, step):
        seen.append(step)
        mnist_cnn.train(m.module, epochs=1, lr=5e-4, seed=step)

    results = prune_iteratively(model, steps=3, target_macs=0.5, finetune=finetune,
                                options="criterion=taylor,scope=global,round-to=8", data=data)
    macs = [results[0].report.original.macs] + [r.report.final.macs for r in results]
    acc = mnist_cnn.accuracy(results[-1].model.module)
    print(f"\nMNIST-5k iterative taylor, 3 x (prune + 1 epoch): MACs "
          f"{' -> '.join(str(m) for m in macs)}, top-1 {acc0:.3f} -> {acc:.3f}")
    assert seen == [0, 1, 2]
    assert macs[-1] <= 0.5 * macs[0] and macs[1] > macs[-1]
    assert acc >= acc0 - 0.01


def test_slim_opt_prunes_and_rejects_bad_ratio(tmp_path):
    import subprocess
    import sys

    from graphslim.benchmarks.assets import export_onnx

    module, x = _torchvision("resnet18", 64)
    src = export_onnx(module, x, tmp_path / "r18.onnx")
    base = [sys.executable, "tools/slim_opt.py", src, "-o", str(tmp_path / "out.onnx"),
            "--no-timing", "-p"]
    ok = subprocess.run(base + ["prune-channels{ratio=0.5}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    pruned = graphslim.load(str(tmp_path / "out.onnx"))
    assert compute_cost(pruned.view(), pruned.infer_shapes()).macs < \
        0.35 * compute_cost(graphslim.load(src).view(), graphslim.load(src).infer_shapes()).macs
    bad = subprocess.run(base + ["prune-channels{ratio=1.5}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ratio must be in [0, 1)" in bad.stderr


def test_exact_only_leaves_layernorm_groups(frontend, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.ReLU(),
                           nn.Linear(32, 4)).eval()
    model = make_model(frontend, module, torch.randn(2, 8), tmp_path, "ln")
    text = "prune-channels{ratio=0.5,round-to=8,exact-only=true}"
    res = _pipeline(model, text)
    widths = sorted(res.model.view().param_info(n.name, "weight")[0][0]
                    for n in res.model.view().nodes() if n.kind.value == "linear")
    assert widths == [4, 16, 32]  # the LayerNorm'd 32 stays, the plain hidden 32 halves
    assert any("inexact" in s.reason and "LayerNorm" in s.reason for s in res.report.skipped())
    res = _pipeline(model, "prune-channels{ratio=0.5,round-to=8}")
    assert sorted(res.model.view().param_info(n.name, "weight")[0][0]
                  for n in res.model.view().nodes() if n.kind.value == "linear") == [4, 16, 16]


@pytest.mark.parametrize("frontend_name", ["fx", "onnx"])
def test_zoo_benchmark_row(frontend_name):
    """The CI subset of benchmarks/prune_bench.py's table: one small model, both frontends."""
    from graphslim.benchmarks.prune_bench import prune_row

    row = prune_row("mobilenet_v3_small", frontend_name, ratio=0.5, repeats=3)
    assert row["status"] == "ok", row
    assert row["macs"][1] < 0.5 * row["macs"][0]
    assert row["groups"] > 10 and row["blocked"] >= 1
    assert row["latency"][0] > 0 and row["latency"][1] > 0
