"""reconstruct: refitting compressed layers to the original model's outputs, without training.

The math is checked against torch's own convolution (a grouped, strided, dilated, padded conv
is recovered from its inputs and outputs); the pass on real trained models with calibration
data disjoint from the evaluation data: the MNIST CNN (both frontends) pruned to half its MACs,
and the page-orientation classifier (a third-party ONNX file) pruned at ratio 0.3, calibrated on
natural photos (at 0.5, on text pages typeset here too) and judged on rotated scanned pages.
A pipeline that compresses nothing leaves every weight as it was."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphslim
from graphslim.benchmarks import mnist_cnn
from graphslim.benchmarks.assets import (
    ORIENTATION,
    natural_photos,
    rendered_text_pages,
    rotated_text_pages,
)
from graphslim.passes import reconstruct_math as rm
from graphslim.provenance import Provenance
from tests.conftest import make_model, package_file


def test_patch_rows_and_ridge_recover_a_grouped_conv():
    """Rows sampled by patch_rows, solved per group by ridge from zero weights, give back the
    weights torch's conv2d used (stride 2, dilation 2, asymmetric padding, 2 groups), to 1e-6."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    x = rng.normal(size=(4, 4, 13, 11)).astype(np.float32)
    padded = torch.nn.functional.pad(torch.from_numpy(x), (2, 1, 1, 0))  # left right top bottom
    y = torch.nn.functional.conv2d(padded, torch.from_numpy(w), torch.from_numpy(b), stride=2,
                                   dilation=2, groups=2).numpy()
    kernel, strides, dilations, pads = (3, 3), (2, 2), (2, 2), (1, 2, 0, 1)
    assert rm.conv_output_size(x.shape[2:], kernel, strides, pads, dilations) == y.shape[2:]
    where = rm.sample_positions(len(x), y.shape[2:], 200, rng)
    rows = rm.patch_rows(x, kernel, strides, pads, dilations, 2, where)
    normal = rm.Normal(2, 2 * 9 + 1, 3)
    normal.add(rm.with_ones(rows).astype(np.float64), rm.output_rows(y, where, 2))
    w0 = np.zeros((2, 19, 3))
    got = rm.ridge(normal, w0, 1e-12)
    weight, bias = rm.split_conv_weights(got, w.shape, True)
    np.testing.assert_allclose(weight, w, atol=1e-6)
    np.testing.assert_allclose(bias, b, atol=1e-6)
    assert normal.error(got) < 1e-9 * normal.energy()
    # the layouts round-trip, and W0 itself has the error the matrices say it has
    np.testing.assert_array_equal(rm.split_conv_weights(rm.conv_weights(w, b, 2), w.shape,
                                                        True)[0], w)
    # the error the matrices give for any W is the direct one
    other = rng.normal(size=(2, 19, 3))
    xr = rm.with_ones(rows).astype(np.float64).transpose(1, 0, 2)  # (g, R, F)
    direct = float(((xr @ other - rm.output_rows(y, where, 2).transpose(1, 0, 2)) ** 2).sum())
    assert normal.error(other) == pytest.approx(direct, rel=1e-9)


def test_choose_refit_keeps_weights_that_do_not_improve():
    """A layer whose rows already fit exactly is not refit (W0 is the bar on held-out rows)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 1, 5))
    w0 = rng.normal(size=(1, 5, 2))
    fit, held = rm.Normal(1, 5, 2), rm.Normal(1, 5, 2)
    fit.add(x[:300], x[:300] @ w0[0])
    held.add(x[300:], x[300:] @ w0[0])
    assert rm.choose_refit(fit, held, w0).weights is None
    # a perturbed W0 is pulled back to the exact weights
    refit = rm.choose_refit(fit, held, w0 + 0.3)
    assert refit.weights is not None and refit.after < 1e-3 < refit.before


def _accuracy(model, name: str) -> float:
    _, (x, y) = mnist_cnn.data()
    step = 100 if model.name == "fx" else 1  # the exported file has a fixed batch of 1
    out = np.concatenate([next(iter(model.run({name: x[i:i + step]}).values()))
                          for i in range(0, len(x), step)])
    return float((out.argmax(1) == y).mean())


def _digits(frontend, tmp_path):
    base = mnist_cnn.trained()
    model = make_model(frontend, base, mnist_cnn.example(), tmp_path, "mnist")
    (xtr, _), _ = mnist_cnn.data()
    name = model.input_specs()[0].name
    return model, name, {name: xtr[:128]}  # training digits; evaluation: the held-out ones


def test_nothing_compressed_reconstructs_to_the_same_weights(frontend, tmp_path):
    """fold-bn then reconstruct: every layer already matches the (folded) original, so no
    weight changes, and each layer says so."""
    model, name, calib = _digits(frontend, tmp_path)
    folded = graphslim.optimize(model, "fold-bn", data=calib).model
    res = graphslim.optimize(folded, "reconstruct", data=calib)
    rec = res.report.records[-1]
    assert rec.edits == 0 and rec.stats.get("refit", 0) == 0
    assert len(rec.skipped) == 6 and all("already matches" in s.reason for s in rec.skipped)
    a, b = folded.view(), res.model.view()
    for node in a.nodes():
        if a.has_param(node.name, "weight"):
            np.testing.assert_array_equal(a.param(node.name, "weight"),
                                          b.param(node.name, "weight"))


def test_mnist_half_the_macs_within_a_point_without_training(frontend, tmp_path):
    """Pruned to half its MACs the CNN drops ~3 points on 1000 held-out digits; reconstructed on
    128 training digits it is within 1 point of the original, with no gradient step."""
    model, name, calib = _digits(frontend, tmp_path)
    acc0 = _accuracy(model, name)
    pruned = graphslim.optimize(model, "prune-channels{target-macs=0.5}", data=calib)
    res = graphslim.optimize(model, "prune-channels{target-macs=0.5},reconstruct", data=calib)
    acc_pruned, acc = _accuracy(pruned.model, name), _accuracy(res.model, name)
    macs = res.report.final.macs / res.report.original.macs
    print(f"\nMNIST ({frontend}): MACs {macs:.2f}x, accuracy {acc0:.3f} -> pruned "
          f"{acc_pruned:.3f} -> reconstructed {acc:.3f}")
    assert macs <= 0.5
    assert acc_pruned < acc0 - 0.02  # the pruning alone does lose accuracy (0.942 vs 0.973)
    assert acc >= acc0 - 0.01
    rec = res.report.records[-1]
    assert rec.stats["refit"] >= 4 and rec.stats["samples"] == 128
    assert all(d["after"] < d["before"] for d in rec.details if d["node"] not in
               {s.node for s in rec.skipped})


def test_bn_folded_after_pruning_is_mapped_to_the_original(tmp_path):
    """prune-channels, then fold-bn, then reconstruct: the conv outputs now carry what the
    original computed after its BatchNorms (provenance aliases them), and the pruned channels
    map back to the original's channel numbers; the refit still recovers the accuracy."""
    model, name, calib = _digits("onnx", tmp_path)
    acc0 = _accuracy(model, name)
    res = graphslim.optimize(model, "prune-channels{target-macs=0.5},fold-bn,reconstruct",
                             data=calib)
    rec = res.report.records[-1]
    assert rec.stats["refit"] >= 4
    assert not any("no matching value" in s.reason for s in rec.skipped)
    assert _accuracy(res.model, name) >= acc0 - 0.015


def test_provenance_composes_channel_slices(tmp_path):
    from graphslim.edits import SliceParam

    model, _, _ = _digits("onnx", tmp_path)
    view = model.view()
    conv = next(n for n in view.nodes() if n.kind is graphslim.ir.OpKind.CONV)
    prov = Provenance(model.copy())
    prov.record(view, [SliceParam(conv.name, "weight", 0, [1, 3, 5, 7])])
    model.apply([SliceParam(conv.name, "weight", 0, [1, 3, 5, 7])])
    prov.record(model.view(), [SliceParam(conv.name, "weight", 0, [0, 2])])
    assert prov.channels(conv.output, 2).tolist() == [1, 5]
    assert prov.channels("untouched", 3).tolist() == [0, 1, 2]


def test_orientation_classifier_recovers_on_photos(tmp_path):
    """The page-orientation classifier (PP-LCNet, a third-party ONNX file) at ratio 0.3 keeps
    almost no agreement with itself on rotated scanned pages; reconstructed on 32 crops of
    natural photos (no text, no page), it agrees on >= 95% of them."""
    src = package_file(*ORIENTATION)
    name = onnx.load(src, load_external_data=False).graph.input[0].name
    x, _ = rotated_text_pages()
    calib = {name: natural_photos(32)}
    model = graphslim.load(src, input_shapes={name: (1, 3, 224, 224)})

    def top1(m):
        return np.array([next(iter(m.run({name: x[i:i + 1]}).values())).argmax()
                         for i in range(len(x))])

    ref = top1(model)
    pruned = graphslim.optimize(model, "prune-channels{ratio=0.3}", data=calib).model
    res = graphslim.optimize(model, "prune-channels{ratio=0.3},reconstruct", data=calib)
    agree_pruned, agree = (float((top1(m) == ref).mean()) for m in (pruned, res.model))
    macs = res.report.final.macs / res.report.original.macs
    print(f"\norientation classifier ratio 0.3 (MACs {macs:.2f}x): agreement on {len(x)} rotated "
          f"pages {agree_pruned:.2f} -> reconstructed {agree:.2f}")
    assert agree_pruned < 0.5 and agree >= 0.95 and macs < 0.6
    onnx.checker.check_model(res.model.to_proto(), full_check=True)


def test_orientation_classifier_at_half_the_channels_needs_in_domain_calibration(tmp_path):
    """At ratio 0.5 photos are not enough: reconstruct calibrated on them alone keeps about 0.6
    agreement on the rotated scanned page. Text pages typeset here (matplotlib's fonts, none
    of the page's pixels), which the original itself reads correctly, bring it to >= 0.95."""
    src = package_file(*ORIENTATION)
    name = onnx.load(src, load_external_data=False).graph.input[0].name
    x, _ = rotated_text_pages()
    text, text_labels = rendered_text_pages(64, seed=1)
    model = graphslim.load(src, input_shapes={name: (1, 3, 224, 224)})

    def top1(m, inputs):
        return np.concatenate([next(iter(m.run({name: inputs[i:i + 8]}).values())).argmax(1)
                               for i in range(0, len(inputs), 8)])

    assert np.mean(top1(model, text) == text_labels) >= 0.95  # in the model's domain
    ref = top1(model, x)
    agree = {}
    for label, calib in (("photos", natural_photos(32)),
                         ("text+photos", np.concatenate([text, natural_photos(32)]))):
        res = graphslim.optimize(model, "prune-channels{ratio=0.5},reconstruct",
                                 data={name: calib})
        agree[label] = float(np.mean(top1(res.model, x) == ref))
    print(f"\norientation classifier ratio 0.5 + reconstruct, agreement on {len(x)} rotated page "
          f"crops by calibration: {agree}")
    assert agree["text+photos"] >= 0.95 and agree["text+photos"] > agree["photos"]


def test_synthetic_inputs_are_said_and_options_are_checked(tmp_path):
    model, _, _ = _digits("onnx", tmp_path)
    res = graphslim.optimize(model, "prune-channels{ratio=0.5},reconstruct")
    assert any("SYNTHETIC" in n for n in res.report.records[-1].notes)
    for bad in ("reconstruct{rows=0}", "reconstruct{min-gain=1}"):
        with pytest.raises(graphslim.PipelineError):
            graphslim.PassManager(bad)


def test_slim_opt_refuses_reconstruct_without_data(tmp_path):
    import subprocess
    import sys

    model, name, calib = _digits("onnx", tmp_path)
    src = tmp_path / "in.onnx"
    model.save(str(src))
    cmd = [sys.executable, "tools/slim_opt.py", str(src), "-o", str(tmp_path / "out.onnx"),
           "-p", "prune-channels{ratio=0.5},reconstruct", "--no-timing"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "reconstruct" in proc.stderr
    np.savez(tmp_path / "calib.npz", **calib)
    proc = subprocess.run(cmd + ["--calib-data", str(tmp_path / "calib.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_capture_from_a_cut_equals_capture_from_the_inputs(frontend, tmp_path):
    """Feeding an intermediate value cuts the graph there (reconstruct carries values from
    round to round): the later values come out as from the model's inputs, on both frontends,
    at a batch of 16 even where the file was exported with a batch of 1."""
    model, name, calib = _digits(frontend, tmp_path)
    convs = [n for n in model.view().nodes() if n.kind is graphslim.ir.OpKind.CONV]
    feed = {name: calib[name][:16]}
    mid, late = convs[1].output, convs[-1].output
    full = model.capture(feed, [mid, late], optimized=True)
    cut = model.capture({mid: full[mid]}, [late], optimized=True)
    assert full[late].shape[0] == 16
    np.testing.assert_allclose(cut[late], full[late], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pipeline,frontend", [("conv-separable", "onnx"),
                                               ("conv-group{groups=2}", "fx")])
def test_substituted_convs_are_refit(pipeline, frontend, tmp_path):
    """After a conv substitution the chain's last layer writes the replaced conv's output (fx
    gives it a new name; provenance follows the readers) and is refit, with every layer after
    it: depthwise + pointwise at multiplier 1 (10% top-1 alone) and grouped convs come back
    within 2 points of the original."""
    model, name, calib = _digits(frontend, tmp_path)
    acc0 = _accuracy(model, name)
    alone = _accuracy(graphslim.optimize(model, pipeline, data=calib).model, name)
    res = graphslim.optimize(model, pipeline + ",reconstruct", data=calib)
    acc = _accuracy(res.model, name)
    print(f"\n{pipeline} ({frontend}): {acc0:.3f} -> {alone:.3f} -> reconstructed {acc:.3f}")
    substituted = sum(res.report.records[0].stats.values())  # 'separated' / 'grouped'
    assert substituted >= 3 and res.report.records[-1].stats["refit"] >= substituted
    assert alone < acc0 - 0.05 and acc >= acc0 - 0.02
