"""qdq: calibration statistics, placement that keeps ONNX Runtime's kernels integer, error
reporting, bad input. Real-data accuracy is in tests/test_qdq_real.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphslim
from graphslim.analyses.calibration import Histogram, calibrate_range, grid
from graphslim.benchmarks.assets import export_onnx
from graphslim.errors import InputError, PipelineError
from graphslim.passes import qdq_math as qm
from graphslim.runtime import int8_kernels
from graphslim.verify import compare
from tests.conftest import randomize_bn


class Block(nn.Module):
    """conv-bn-relu, a residual add, max pool, SiLU, global pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(16, 32, 1)
        self.act = nn.SiLU()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.body(y) + y)
        y = self.act(self.conv(self.pool(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _block_model(tmp_path):
    torch.manual_seed(0)
    module = randomize_bn(Block()).eval()
    x = torch.randn(1, 3, 16, 16)
    return module, graphslim.load(export_onnx(module, x, tmp_path / "block.onnx"))


def _calib(n=32, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


# --- calibration statistics ------------------------------------------------------------------
def test_histogram_doubling_keeps_counts_exact():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10_000).astype(np.float32)
    b = (40 * rng.standard_normal(10_000)).astype(np.float32)
    h = Histogram.of(a)
    h.add(b)  # range grows 2^k-fold: pairs of bins merge
    direct, _ = np.histogram(np.concatenate([a, b]), bins=h.edges)
    assert h.counts.sum() == 20_000
    assert np.abs(h.counts - direct).max() <= 2  # only float edge ties may differ
    assert (h.lo, h.hi) == (min(a.min(), b.min()), max(a.max(), b.max()))


def test_ranges_by_method_on_heavy_tails():
    """minmax is the exact range; percentile and entropy clip two rare outliers, which cuts the
    quantization error of the bulk of the data tenfold; mse finds the range of least total
    squared error (outliers included), no worse than any other method's."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [60.0, -45.0]]).astype(np.float32)
    h = Histogram.of(x)
    lo, hi = calibrate_range(h, "minmax")
    assert (lo, hi) == (pytest.approx(-45.0), pytest.approx(60.0))
    bulk, total = {}, {}
    for method in ("minmax", "percentile", "mse", "entropy"):
        lo, hi = calibrate_range(h, method)
        scale, zp = grid(lo, hi)
        deq = qm.fake_quantize(x, np.float32(scale), np.uint8(zp), None, "uint8")
        total[method] = float(np.mean((deq - x) ** 2))
        bulk[method] = float(np.mean((deq - x)[:-2] ** 2))
        if method in ("percentile", "entropy"):
            assert hi < 20 and lo > -20, (method, lo, hi)
    assert bulk["percentile"] < bulk["minmax"] / 10
    assert bulk["entropy"] < bulk["minmax"] / 10
    assert bulk["mse"] < bulk["minmax"]
    assert total["mse"] <= 1.05 * min(total.values())


def test_grid_represents_zero_exactly():
    for lo, hi in ((-1.3, 2.7), (0.0, 6.0), (0.5, 3.0), (-4.0, -1.0)):
        scale, zp = grid(lo, hi)
        assert 0 <= zp <= 255
        assert qm.fake_quantize(np.zeros(1), np.float32(scale), np.uint8(zp), None,
                                "uint8")[0] == 0.0
    assert grid(0.0, 6.0)[1] == 0  # a ReLU output gets zero point 0 (ORT drops the ReLU)


def test_weight_quantization_is_symmetric_per_channel():
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[3] *= 100
    s = qm.weight_scales(w)
    q = qm.quantize(w, s, np.zeros(8, np.int8), 0, "int8")
    assert q.min() >= -127 and q.max() <= 127
    assert np.all(np.abs(q).reshape(8, -1).max(1) == 127)  # every channel uses its full grid
    err = np.abs(qm.dequantize(q, s, np.zeros(8), 0) - w).reshape(8, -1).max(1)
    assert np.all(err <= s / 2 + 1e-6)
    s4 = qm.weight_scales(w, bits=4)
    assert np.abs(qm.quantize(w, s4, np.zeros(8, np.int8), 0, "int8")).max() == 7


def test_bias_shift_is_the_mean_output_change_of_rounded_weights():
    """qdq_math.bias_shift against the real thing: the mean over pixels of a grouped conv's
    output change when its weight is rounded to 3 bits."""
    import torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)  # groups 2: 4 inputs
    # channel means far from zero; constant over each image, so every window's mean is the
    # image's (the formula ignores border effects)
    x = np.broadcast_to(rng.standard_normal((16, 4, 1, 1)) + rng.standard_normal((1, 4, 1, 1))
                        * 2, (16, 4, 10, 10)).astype(np.float32)
    s = qm.weight_scales(w, bits=3)
    wq = qm.fake_quantize(w, s, np.zeros(8, np.int8), 0, "int8")
    conv = [torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(k), groups=2)
            .numpy() for k in (w, wq)]
    measured = (conv[1] - conv[0]).mean(axis=(0, 2, 3))
    predicted = qm.bias_shift(w, wq, x.mean(axis=(0, 2, 3)), groups=2)
    assert np.abs(measured).max() > 0.1  # a shift worth correcting ...
    np.testing.assert_allclose(predicted, measured, rtol=1e-4, atol=1e-5)  # ... predicted


# --- the pass ------------------------------------------------------------------------------------
def test_qdq_runs_every_conv_and_linear_in_int8(tmp_path):
    """fold-bn,qdq: every Conv and the Linear run as ORT integer kernels (read from ORT's
    optimized graph), the ReLUs are absorbed, SiLU stays a fused float op, and the output stays
    close to float (SQNR >= 25 dB on held-out inputs)."""
    module, model = _block_model(tmp_path)
    result = graphslim.optimize(model, "fold-bn,qdq", data=_calib())
    out = result.model
    kernels = int8_kernels(out.model_ref())
    assert kernels == {"conv": (3, 3), "matmul": (1, 1)}, kernels
    ops = out.view().op_counts()
    assert ops.get("QuickGelu") == 1 and "Sigmoid" not in ops
    onnx.checker.check_model(out.to_proto(), full_check=True)
    held_out = {"x": _calib(8, seed=7)["x"]}
    ref = np.concatenate([model.run({"x": held_out["x"][i:i + 1]})[model.view().outputs[0]]
                          for i in range(8)])
    got = np.concatenate([out.run({"x": held_out["x"][i:i + 1]})[out.view().outputs[0]]
                          for i in range(8)])
    metrics = compare({"y": ref}, {"y": got})
    print(f"block fold-bn,qdq: SQNR {metrics.sqnr_db:.1f} dB, cosine {metrics.cosine:.5f}")
    assert metrics.sqnr_db >= 25
    record = result.report.records[-1]
    assert record.stats["int8_conv"] == 3 and record.stats["int8_linear"] == 1
    assert record.error_orig is not None and record.verified == "reported"


def test_qdq_exclude_keeps_layer_float(tmp_path):
    _, model = _block_model(tmp_path)
    conv = next(n.name for n in model.view().nodes() if n.op == "Conv")
    result = graphslim.optimize(model, f"fold-bn,qdq{{exclude={conv}}}", data=_calib())
    assert int8_kernels(result.model.model_ref())["conv"] == (2, 3)
    assert any(s.node == conv and "excluded" in s.reason
               for s in result.report.records[-1].skipped)


def test_qdq_int8_silu_when_asked(tmp_path):
    _, model = _block_model(tmp_path)
    result = graphslim.optimize(model, "fold-bn,qdq{ops=conv;linear;add;avgpool;mul;sigmoid;"
                                "silu}", data=_calib())
    ops = result.model.view().op_counts()
    assert "QuickGelu" not in ops and ops["Sigmoid"] == 1


def test_qdq_sensitivity_keeps_worst_layers_float(tmp_path):
    """4-bit weights put the error far above a 1% budget: the sensitivity mode keeps the most
    sensitive layers float until the budget holds, and says which."""
    _, model = _block_model(tmp_path)
    loose = graphslim.optimize(model, "fold-bn,qdq{weight-bits=4}", data=_calib())
    strict = graphslim.optimize(model, "fold-bn,qdq{weight-bits=4,max-error=0.02}",
                                data=_calib())
    e_loose = loose.report.records[-1].error_orig.rel_l2
    e_strict = strict.report.records[-1].error_orig.rel_l2
    kept = [s for s in strict.report.records[-1].skipped if "sensitivity" in s.reason]
    print(f"4-bit: rel L2 {e_loose:.4f} all layers; {e_strict:.4f} with {len(kept)} kept float")
    assert e_loose > 0.02 and kept
    assert e_strict < e_loose


def test_qdq_bad_input(tmp_path):
    _, model = _block_model(tmp_path)
    with pytest.raises(InputError, match="shape"):
        graphslim.optimize(model, "qdq", data={"x": np.zeros((4, 3, 8, 8), np.float32)})
    with pytest.raises(InputError, match="dtype"):
        graphslim.optimize(model, "qdq", data={"x": np.zeros((4, 3, 16, 16), np.int64)})
    with pytest.raises(InputError, match="empty"):
        graphslim.optimize(model, "qdq", data={"x": np.zeros((0, 3, 16, 16), np.float32)})
    with pytest.raises(PipelineError, match="calibration method"):
        graphslim.optimize(model, "qdq{method=kl}", data=_calib())
    with pytest.raises(PipelineError, match="ops"):
        graphslim.optimize(model, "qdq{ops=softmax}", data=_calib())


def test_slim_opt_calib_data_and_slim_info(tmp_path):
    """The command line: --calib-data FILE.npz, the int8 summary of slim_info; without data qdq
    is refused, and with --synthetic-calibration the tool warns that it calibrates on noise."""
    _, model = _block_model(tmp_path)
    src, calib = tmp_path / "block.onnx", tmp_path / "calib.npz"
    np.savez(calib, **_calib())
    out = tmp_path / "block_int8.onnx"
    cmd = [sys.executable, "tools/slim_opt.py", str(src), "-o", str(out), "-p",
           "fold-bn,qdq{choose=cost}", "--calib-data", str(calib), "--no-timing"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "synthetic" not in proc.stderr
    info = subprocess.run([sys.executable, "tools/slim_info.py", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "int8 under ONNX Runtime (CPU): Conv 3 of 3, MatMul/Gemm 1 of 1" in info.stdout
    cmd[cmd.index("--calib-data"):cmd.index("--calib-data") + 2] = []
    cmd[cmd.index("-o") + 1] = str(tmp_path / "synthetic.onnx")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs calibration data" in proc.stderr  # no data, no int8
    proc = subprocess.run(cmd + ["--synthetic-calibration"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "synthetic" in proc.stderr


def test_equalize_is_exact_and_rescues_per_tensor_weights(tmp_path):
    """Cross-layer equalization on conv -> relu -> conv -> relu -> conv whose channels were
    rescaled by up to 300x (same function): the pass is exact (verified by the pass manager at
    fp32 tolerances), evens out the per-channel weight ranges, and with per-tensor int8 weights
    lifts the SQNR of the quantized model far above the unequalized one's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    s = torch.logspace(-1.2, 1.2, 16)  # 0.06 .. 16: a 250x spread, absorbed by the next layer
    with torch.no_grad():
        for first, second in ((net[0], net[2]), (net[2], net[4])):
            first.weight.mul_(s.view(-1, 1, 1, 1))
            first.bias.mul_(s)
            second.weight.div_(s.view(1, -1, 1, 1))
    model = graphslim.load(export_onnx(net, torch.randn(1, 3, 16, 16), tmp_path / "chain.onnx"))
    eq = graphslim.optimize(model, "equalize")
    assert eq.report.records[0].verified == "numerical"
    w = eq.model.view().param(eq.model.view().nodes()[0].name, "weight")
    ranges = np.abs(w).reshape(16, -1).max(1)
    assert ranges.max() / ranges.min() < 20  # was ~250x
    sqnr = {}
    for text in ("qdq{per-channel=false}", "equalize,qdq{per-channel=false}"):
        result = graphslim.optimize(model, text, data=_calib())
        sqnr[text] = result.report.records[-1].error_orig.sqnr_db
    print(f"per-tensor int8 SQNR: {sqnr}")
    assert sqnr["equalize,qdq{per-channel=false}"] > sqnr["qdq{per-channel=false}"] + 6
