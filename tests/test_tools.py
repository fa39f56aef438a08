"""The command-line tools, run as subprocesses on real exported ONNX files."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

from graphslim.benchmarks.assets import export_onnx
from tests.conftest import randomize_bn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool(name, *args, check_rc=None):
    if name == "slim_opt":  # latency and the speed bar are tests/test_judgement.py's subject
        args = (*args, "--no-timing")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    path = tmp_path_factory.mktemp("m") / "small.onnx"
    return export_onnx(module, torch.randn(1, 3, 16, 16), path)


def _digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_slim_opt_folds_and_reports(small_onnx, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    digest = _digest(small_onnx)
    proc = _tool("slim_opt", small_onnx, "-o", out, "-p", "fold-bn", "--json", report, "--stats",
                 "--pass-times", "--print-ir-after", "fold-bn", check_rc=0)
    assert "fold-bn" in proc.stdout and "stats fold-bn" in proc.stdout
    assert "IR after fold-bn" in proc.stderr
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert json.loads(report.read_text())["passes"][0]["verified"] == "numerical"
    assert _digest(small_onnx) == digest


def test_slim_opt_dry_run_writes_nothing(small_onnx, tmp_path):
    out = tmp_path / "never.onnx"
    _tool("slim_opt", small_onnx, "-o", out, "-p", "fold-bn", "--dry-run", check_rc=0)
    assert not out.exists()


def test_slim_opt_list_passes():
    assert "fold-bn" in _tool("slim_opt", "--list-passes", check_rc=0).stdout


def test_slim_opt_bad_inputs(small_onnx, tmp_path):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(pathlib.Path(small_onnx).read_bytes()[:300])
    out = tmp_path / "o.onnx"
    cases = [
        ((tmp_path / "missing.onnx", "-o", out, "-p", "fold-bn"), "no such file"),
        ((not_onnx, "-o", out, "-p", "fold-bn"), "not a valid ONNX file"),
        ((truncated, "-o", out, "-p", "fold-bn"), "ONNX"),
        ((small_onnx, "-o", out, "-p", "fold-bnn"), "unknown pass 'fold-bnn'"),
        ((small_onnx, "-o", out, "-p", "fold-bn{copy-shared=2}"), "expects bool"),
        ((small_onnx, "-o", out, "-p", "fold-bn", "--input-shape", "x:1,a"), "bad --input-shape"),
        ((small_onnx, "-o", out, "-p", "fold-bn", "--input-shape", "y:1,3,16,16"),
         "model's inputs are: x"),
        ((small_onnx, "-o", out, "-p", "fold-bn", "--input-shape", "x:1,4,16,16"), "conflicts"),
        ((small_onnx, "-p", "fold-bn"), "need INPUT"),
    ]
    for args, message in cases:
        proc = _tool("slim_opt", *args, check_rc=2)
        assert message in proc.stderr, (args, proc.stderr)
        assert not out.exists()


def test_slim_opt_refuses_to_overwrite_input(small_onnx, tmp_path):
    copy = tmp_path / "m.onnx"
    shutil.copy(small_onnx, copy)
    digest = _digest(copy)
    proc = _tool("slim_opt", copy, "-o", copy, "-p", "fold-bn", check_rc=2)
    assert "refusing to overwrite" in proc.stderr and _digest(copy) == digest


def test_slim_info_and_bench(small_onnx, tmp_path):
    info = _tool("slim_info", small_onnx, "--layers", "0", check_rc=0).stdout
    assert "Conv" in info and "MACs" in info and "BatchNormalization" in info
    out = tmp_path / "o.onnx"
    _tool("slim_opt", small_onnx, "-o", out, "-p", "fold-bn", check_rc=0)
    bench = _tool("slim_bench", small_onnx, out, "--repeats", "5", check_rc=0).stdout
    assert "speedup" in bench and "top-1 agreement 1.000" in bench


def test_dynamic_input_needs_shape(tmp_path):
    """An input with a dynamic spatial dim needs --input-shape; the output stays dynamic."""
    module = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    path = tmp_path / "dyn.onnx"
    module.eval()
    torch.onnx.export(module, (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False,
                      do_constant_folding=False)
    out = tmp_path / "o.onnx"
    assert "give a concrete shape" in _tool("slim_opt", path, "-o", out, "-p", "fold-bn",
                                            check_rc=2).stderr
    _tool("slim_opt", path, "-o", out, "-p", "fold-bn", "--input-shape", "x:2,3,20,20",
          check_rc=0)
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["n", "", "h", "w"]


def test_slim_opt_factorize(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3),
                           nn.Flatten(), nn.Linear(32 * 14 * 14, 64))
    src = export_onnx(module, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    out, report = tmp_path / "f.onnx", tmp_path / "r.json"
    proc = _tool("slim_opt", src, "-o", out, "-p", "factorize{method=auto,rank=0.25}",
                 "--json", report, check_rc=0)
    assert "factorize" in proc.stdout
    details = json.loads(report.read_text())["passes"][0]["details"]
    methods = [d["method"] for d in details]
    assert "svd" in methods and len(methods) >= 2  # the Linear, and at least one 3x3 conv
    assert all(d["macs_after"] < d["macs_before"] for d in details)
    onnx.checker.check_model(onnx.load(out), full_check=True)
