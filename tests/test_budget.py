"""Compression to a budget (graphslim/budget/): sensitivity on real data, the allocation, the
search's choice checked independently, the same choice on 1 worker, a process pool and a local
2-worker Ray cluster, recipes and the two tools.

The model is the shipped digits CNN with real held-out MNIST digits: calibration digits 0-199
(20 per class), evaluation digits 200-599 with their labels (disjoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import graphslim
from graphslim.budget import compress, sensitivity
from graphslim.budget.allocate import greedy, with_midpoints
from graphslim.budget.sensitivity import prune_groups
from graphslim.budget.workers import map_tasks
from graphslim.runtime import THREADS_ENV
from graphslim.tools.demo import demo_files, digits


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    x, y = digits()
    np.savez(d / "calib.npz", image=x[:200])
    np.savez(d / "eval.npz", image=x[200:600], labels=y[200:600])
    return demo_files()[0], str(d / "calib.npz"), str(d / "eval.npz"), x[200:600], y[200:600]


def _accuracy(path_or_bytes, x, y) -> float:
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(1) == y).mean())


def test_greedy_takes_the_cheapest_saving_first():
    table = {"a": {"levels": [0.5, 1.0], "saved": [0.4, 0.5], "loss": [0.1, 1.0]},
             "b": {"levels": [0.5, 1.0], "saved": [0.2, 0.3], "loss": [0.01, 0.02]}}
    assert greedy(table, 0.25) == {"b": 1.0}  # b's full step: 0.02 for 0.3 beats a's 0.1/0.4
    assert greedy(table, 0.6) == {"a": 0.5, "b": 1.0}
    assert greedy(table, 5.0) == {"a": 1.0, "b": 1.0}  # everything, the goal out of reach
    mid = with_midpoints([0.5], [0.4], [0.2])
    assert mid == {"levels": [0.25, 0.5], "saved": [0.2, 0.4], "loss": [0.1, 0.2]}


def test_sensitivity_points_are_the_real_accuracy(digit_files):
    model, calib, evalp, x, y = digit_files
    sens = sensitivity(model, evalp, calib, levels=(0.5, 0.75), metric="accuracy")
    base = _accuracy(model, x, y)
    assert sens.value_before == pytest.approx(base, abs=1e-9)
    groups = prune_groups(graphslim.load(model))
    assert set(sens.curves["prune"]) == set(groups) and not sens.failed
    name, pts = next(iter(sens.curves["prune"].items()))
    point = pts[-1]
    run = graphslim.optimize(graphslim.load(model), point["pipeline"])  # independently
    assert point["value"] == pytest.approx(_accuracy(run.model.deployable(), x, y), abs=1e-9)
    assert point["drop"] == pytest.approx(base - point["value"], abs=1e-9)
    assert 0 < point["macs"] < 1
    assert "drop@0.5" in sens.table()


def test_sensitivity_of_coupled_groups_and_int8(frontend_free_mobilenet):
    path, evalp, calibp = frontend_free_mobilenet
    sens = sensitivity(path, evalp, calibp, kinds=("prune", "qdq"), levels=(0.5,),
                       metric="cosine")
    groups = prune_groups(graphslim.load(path))
    coupled = [n for n in groups if n in sens.curves["prune"]
               and _spaces(path, n) > 1]
    assert coupled, "mobilenet_v2's residual adds couple convs into one group"
    for n in coupled:  # measured as the group: the point really prunes it
        assert sens.curves["prune"][n][0]["macs"] < 1
    qdq = sens.curves["qdq"]
    layers = [n.name for n in graphslim.load(path).view().nodes()
              if n.kind.name in ("CONV", "LINEAR", "MATMUL")]
    assert set(qdq) == {"*", *layers}
    all_int8 = qdq.pop("*")[0]["value"]
    assert all_int8 < 1 - 1e-4  # int8 moves the outputs ...
    assert max(p[0]["value"] for p in qdq.values()) >= all_int8 - 1e-4  # ... one float helps


def _spaces(path, name) -> int:
    from graphslim.analyses import AnalysisManager
    from graphslim.analyses.channels import ChannelDepsAnalysis

    deps = AnalysisManager(graphslim.load(path)).get(ChannelDepsAnalysis)
    return next(len(g.spaces) for g in deps.prunable if g.spaces[0] == name)


@pytest.fixture(scope="module")
def frontend_free_mobilenet(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from graphslim.benchmarks.assets import export_onnx

    d = tmp_path_factory.mktemp("mnv2")
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(weights=None, width_mult=0.25).eval()
    path = export_onnx(m, (torch.randn(1, 3, 32, 32),), d / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "eval.npz", x=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    np.savez(d / "calib.npz", x=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    return str(path), str(d / "eval.npz"), str(d / "calib.npz")


def test_compress_meets_the_budget_and_chooses_alike_on_any_workers(digit_files):
    model, calib, evalp, x, y = digit_files
    kw = {"target": {"macs": 0.5}, "max_drop": 0.02, "metric": "accuracy",
          "levels": (0.5, 0.75)}
    one = compress(model, evalp, calib, workers=1, **kw)
    pool = compress(model, evalp, calib, workers=2, **kw)
    assert one.chosen is not None
    assert pool.chosen["decided"] == one.chosen["decided"]
    assert [t["pipeline"] for t in pool.trials] == [t["pipeline"] for t in one.trials]
    # the choice, checked on its own: MACs and accuracy of the pipeline as the user runs it
    run = graphslim.optimize(graphslim.load(model), one.chosen["decided"],
                             data={"image": np.load(calib)["image"]})
    assert run.report.final.macs <= 0.5 * run.report.original.macs
    acc = _accuracy(run.model.deployable(), x, y)
    assert acc == pytest.approx(one.chosen["value"], abs=1e-9)
    assert _accuracy(model, x, y) - acc <= 0.02
    front = [(t["macs"], t["value"]) for t in one.front]
    assert all(not (m2 <= m1 and v2 >= v1 and (m2, v2) != (m1, v1))
               for m1, v1 in front for m2, v2 in front)  # no point of the front dominated


def test_a_worker_runs_onnx_runtime_on_one_cpu(monkeypatch):
    """Pool processes run ORT at one thread (its default, every core, made two workers on two
    cores contend); a count the user set is kept."""
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert map_tasks(os.getenv, [THREADS_ENV] * 2, workers=2) == ["1", "1"]
    monkeypatch.setenv(THREADS_ENV, "3")
    assert map_tasks(os.getenv, [THREADS_ENV] * 2, workers=2) == ["3", "3"]


def test_ray_cluster_of_two_workers_chooses_the_same(digit_files, monkeypatch):
    ray = pytest.importorskip("ray")
    model, calib, evalp, *_ = digit_files
    kw = {"target": {"macs": 0.5}, "max_drop": 0.02, "metric": "accuracy", "levels": (0.5,)}
    one = compress(model, evalp, calib, workers=1, **kw)
    monkeypatch.delenv(THREADS_ENV, raising=False)  # Ray's workers inherit the environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.cluster_resources().get("CPU") == 2
        assert map_tasks(os.getenv, [THREADS_ENV] * 2, workers="ray") == ["1", "1"]
        on_ray = compress(model, evalp, calib, workers="ray", **kw)
    finally:
        ray.shutdown()
    assert on_ray.chosen["decided"] == one.chosen["decided"]
    assert [t["value"] for t in on_ray.trials] == [t["value"] for t in one.trials]


def _tool(name, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", f"graphslim.tools.{name}", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_slim_compress_recipe_writes_the_chosen_model(digit_files, tmp_path):
    model, calib, evalp, x, y = digit_files
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{model}"\noutput = "out.onnx"\n[data]\ncalibration = '
                      f'"{calib}"\nevaluation = "{evalp}"\n[target]\nmacs = 0.5\n'
                      'max_drop = 0.02\nmetric = "accuracy"\n[search]\nlevels = [0.5]\n')
    r = _tool("slim_compress", "--recipe", str(recipe), "--json", str(tmp_path / "r.json"),
              "--plot", str(tmp_path / "front.png"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    out = tmp_path / "out.onnx"  # relative to the recipe's folder
    assert rep["chosen"] and out.exists() and (tmp_path / "front.png").stat().st_size > 1000
    assert _accuracy(str(out), x, y) == pytest.approx(rep["chosen_trial"]["value"], abs=1e-9)
    assert rep["latency"]["cpu"] and rep["latency"]["ratio"] > 0
    recipe.write_text(recipe.read_text() + "typo_key = 1\n")
    bad = _tool("slim_compress", "--recipe", str(recipe))
    assert bad.returncode == 2 and "search.typo_key" in bad.stderr
    same = _tool("slim_compress", model, "-o", model, "--eval-data", evalp, "--target",
                 "macs=0.5")
    assert same.returncode == 2 and "refusing to overwrite" in same.stderr


def test_slim_compress_unreachable_writes_nothing(digit_files, tmp_path):
    model, calib, evalp, *_ = digit_files
    out = tmp_path / "o.onnx"
    r = _tool("slim_compress", model, "-o", str(out), "--eval-data", evalp, "--calib-data",
              calib, "--target", "macs=0.05", "--max-drop", "0", "--levels", "0.5",
              "--metric", "accuracy")
    assert r.returncode == 1 and "nothing written" in r.stderr and not out.exists()


def test_slim_sensitivity_cli(digit_files, tmp_path):
    model, calib, evalp, *_ = digit_files
    r = _tool("slim_sensitivity", model, "--eval-data", evalp, "--levels", "0.5",
              "--metric", "accuracy", "--json", str(tmp_path / "s.json"), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "drop@0.5" in r.stdout
    curves = json.loads((tmp_path / "s.json").read_text())["curves"]["prune"]
    # fold-bn first (the default prefix): l1 sees the BN scales this CNN was trained to zero
    # in half its channels, so the stem at 0.5 loses nothing (unfolded it loses 0.9 of it)
    assert curves["/0/Conv"][0]["drop"] <= 0.01
    bad = _tool("slim_sensitivity", model, "--eval-data", evalp, "--kinds", "qdq")
    assert bad.returncode == 2 and "calibration data" in bad.stderr
    assert os.path.exists(model)
