"""The benchmark harness's --quick matrix end to end: the table's structure, every ratio measured
(not its value: machines are noisy), bad cells reported without stopping the run, the cache."""

from __future__ import annotations

import json
import math
import time

from graphslim.benchmarks import run


def test_quick_matrix(tmp_path):
    t = time.perf_counter()
    assert run.main(["--quick", "--out", str(tmp_path), "--no-cache"]) == 0
    first = time.perf_counter() - t
    rows = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    models = {r["model"] for r in rows}
    assert models == {"mnist_cnn", "resnet18@64"}
    for model in models:
        assert f"## {model}" in md
    ok = [r for r in rows if r["status"] == "ok"]
    # every graphslim pipeline and every ONNX-producing peer ran on ORT and was timed
    for r in rows:
        if r["runtime"] == "ort-cpu-1" and r["variant"] != "no-such-peer":
            assert r["status"] == "ok", r
            assert r["speedup"] > 0 and r["base_ms"] > 0 and math.isfinite(r["cosine"])
    torch_rows = [r for r in ok if r["runtime"] == "torch"]
    assert {r["variant"] for r in torch_rows} == {"fold-bn", "prune-channels{ratio=0.5}"}
    bad = [r for r in rows if r["variant"] == "no-such-peer"]
    assert bad and all("unknown peer" in r["status"] for r in bad)
    mnist = [r for r in ok if r["model"] == "mnist_cnn" and r["variant"] == "fold-bn"]
    assert mnist[0]["accuracy"] == mnist[0]["accuracy_base"] > 0.9  # real digits, lossless
    assert (tmp_path / "results.csv").exists()
    assert (tmp_path / "latency_vs_fidelity.png").stat().st_size > 1000
    # a rerun measures nothing new: every cell comes from the cache
    t = time.perf_counter()
    run.main(["--quick", "--out", str(tmp_path)])
    assert time.perf_counter() - t < first / 3
    assert json.loads((tmp_path / "results.json").read_text()) == rows
