"""Issue 14: every result judged on the user's data and timed on the user's machine.

The demo CNN (trained on real MNIST digits) and its 1,000 held-out real digits: fidelity and the
user's metric on evaluation data disjoint from calibration, the source of the numbers named in
the report, qdq refused on the command line without data, latency in every CLI run with the CPU
named, a result not meeting the speed bar not written, and machine-dependent decisions written
into the pipeline text so it reproduces."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphslim
from graphslim.fidelity import held_out
from graphslim.runtime import cpu_channel_block, make_session

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "graphslim" / "data" / "demo_cnn.onnx")
SHAPE = {"image": (1, 1, 28, 28)}


@pytest.fixture(scope="module")
def digits():
    d = np.load(ROOT / "graphslim" / "data" / "mnist_test.npz")
    x = ((d["images"].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    return x, d["labels"]


def _accuracy(path_or_bytes, x, y) -> float:
    sess = make_session(path_or_bytes, threads=1)
    logits = np.concatenate([sess.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(1) == y).mean())


def test_fidelity_and_metric_on_held_out_eval_data(digits, tmp_path):
    x, y = digits
    calib, (ex, ey) = {"image": x[:300]}, (x[700:], y[700:])

    def metric(outputs):
        return float((outputs["logits"].argmax(1) == ey).mean())

    model = graphslim.load(MODEL, input_shapes=SHAPE)
    result = graphslim.optimize(model, "fold-bn,qdq", data=calib, eval_data={"image": ex},
                                metric=metric)
    rep = result.report.as_dict()
    fid = rep["fidelity"]
    assert fid["data"] == "eval" and fid["samples"] == 300
    # the metric is the user's accuracy, computed independently here with ORT on both files
    result.model.save(str(tmp_path / "q.onnx"))
    assert fid["metric_before"] == pytest.approx(_accuracy(MODEL, ex, ey), abs=1e-9)
    assert fid["metric_after"] == pytest.approx(_accuracy(str(tmp_path / "q.onnx"), ex, ey),
                                                abs=1e-9)
    assert 0.99 < fid["cosine"] <= 1.0 and 0 < fid["rel_l2"] < 0.1 and fid["agreement"] > 0.97
    qdq = rep["passes"][-1]
    assert qdq["fidelity"]["data"] == "eval" and qdq["fidelity"]["metric"] == fid["metric_after"]
    assert "300 eval samples" in result.report.table()


def test_sources_named_and_synthetic_said_loudly(digits):
    x, _ = digits
    model = graphslim.load(MODEL, input_shapes=SHAPE)
    synthetic = graphslim.optimize(model, "prune-channels{ratio=0.5}").report
    assert synthetic.as_dict()["fidelity"]["data"] == "synthetic"
    assert "SYNTHETIC" in synthetic.table() and any("SYNTHETIC" in n for n in synthetic.notes)
    calibration = graphslim.optimize(model, "prune-channels{ratio=0.5}",
                                     data={"image": x[:40]}).report
    assert calibration.judged_on == "calibration"
    assert calibration.fidelity.samples == 40
    with pytest.raises(graphslim.InputError, match="metric= needs real data"):
        graphslim.optimize(model, "fold-bn", metric=lambda out: 0.0)


def test_max_error_is_judged_on_the_eval_data(digits):
    x, _ = digits
    model = graphslim.load(MODEL, input_shapes=SHAPE)
    with pytest.raises(graphslim.VerificationError, match="on eval data"):
        graphslim.optimize(model, "prune-channels{ratio=0.6}", eval_data={"image": x[:50]},
                           max_error=0.01)


def test_held_out_split_is_disjoint():
    specs = graphslim.load(MODEL, input_shapes=SHAPE).input_specs()
    data = {"image": np.arange(50 * 784, dtype=np.float32).reshape(50, 1, 28, 28)}
    calib, held = held_out(data, specs)
    assert len(calib["image"]) == 40 and len(held["image"]) == 10
    seen = {a.tobytes() for a in calib["image"]}
    assert not any(h.tobytes() in seen for h in held["image"])
    small, none = held_out({"image": data["image"][:9]}, specs)
    assert none is None and len(small["image"]) == 9


def test_decided_pipeline_records_the_channel_block():
    model = graphslim.load(MODEL, input_shapes=SHAPE)
    report = graphslim.optimize(model, "prune-channels{ratio=0.5}").report
    assert report.decided == f"prune-channels{{ratio=0.5,round-to={cpu_channel_block()}}}"
    assert report.as_dict()["decided"] == report.decided


def test_time_many_times_each_model_on_two_mirrored_sessions():
    from graphslim.runtime import time_many

    pruned = graphslim.optimize(graphslim.load(MODEL, input_shapes=SHAPE),
                                "prune-channels{ratio=0.5}").model.deployable()
    feeds = {"image": np.zeros((1, 1, 28, 28), np.float32)}
    times = time_many([MODEL, pruned], feeds, max_time=0.05, min_rounds=6, max_rounds=6)
    # 6 rounds x 2 sessions each; both sessions' calls pooled per model
    assert [t.samples for t in times] == [12, 12] and all(t.median > 0 for t in times)


def test_qdq_latency_choice_is_measured_and_reproduces(digits):
    """choose=latency times float and int8 variants in context; whatever it picks is written
    into the pipeline text, and that text gives the same model without measuring."""
    x, _ = digits
    model = graphslim.load(MODEL, input_shapes=SHAPE)
    data = {"image": x[:64]}
    first = graphslim.optimize(model, "fold-bn,qdq{choose=latency}", data=data)
    rec = first.report.records[-1]
    times = rec.details[-1]
    assert {"float", "int8"} <= set(times["latency_ms"]) and times["cpu"]
    confirm = times["confirm_ms"]
    best_int8 = min(v for k, v in confirm.items() if k != "float")
    # the decision follows the measurement: float only where int8 was not min-gain faster
    # (by the pass's own note: the winning int8 variant may itself keep every region float,
    # so a count of quantized values cannot tell; 1e-4 ms: the details are rounded)
    stayed_float = any("the model stays float" in n for n in rec.notes)
    if stayed_float:
        assert best_int8 >= confirm["float"] * 0.97 - 1e-4
    else:
        assert best_int8 < confirm["float"] * 0.97 + 1e-4
    decided = first.report.decided
    assert "choose" not in decided and decided.startswith("fold-bn,qdq")
    again = graphslim.optimize(model, decided, data=data)
    assert not any("choose=latency" in n for r in again.report.records for n in r.notes)
    ops = lambda m: sorted(n.op_type for n in m.to_proto().graph.node)  # noqa: E731
    assert ops(again.model) == ops(first.model)


# --- the command line -----------------------------------------------------------------------

def _slim_opt(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "slim_opt.py"), MODEL,
                           "--input-shape", "image:1,1,28,28", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def calib_npz(digits, tmp_path_factory):
    x, _ = digits
    path = tmp_path_factory.mktemp("d") / "calib.npz"
    np.savez(path, image=x[:200])
    return path


def test_cli_refuses_qdq_without_data(tmp_path):
    proc = _slim_opt("-o", tmp_path / "q.onnx", "-p", "fold-bn,qdq", "--no-timing")
    assert proc.returncode == 2 and "needs calibration data" in proc.stderr
    assert not (tmp_path / "q.onnx").exists()
    ok = _slim_opt("-o", tmp_path / "q.onnx", "-p", "fold-bn,qdq{choose=cost}", "--no-timing",
                   "--synthetic-calibration")
    assert ok.returncode == 0, ok.stderr
    assert "SYNTHETIC" in ok.stdout


def test_cli_holds_out_eval_data_and_reports_latency(calib_npz, tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    proc = _slim_opt("-o", out, "-p", "fold-bn", "--calib-data", calib_npz, "--json", rep,
                     "--allow-slower")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert report["fidelity"]["data"] == "eval" and report["fidelity"]["samples"] == 40
    lat = report["latency"]
    assert lat["before_ms"] > 0 and lat["after_ms"] > 0 and lat["threads"] == 1
    assert lat["speedup"] == pytest.approx(lat["before_ms"] / lat["after_ms"], rel=1e-3)
    assert lat["cpu"] and isinstance(lat["isa"], list) and report["written"] is True
    assert "latency on onnxruntime-cpu" in proc.stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_cli_refuses_an_absent_provider_before_any_work(tmp_path):
    from graphslim.runtime import available_providers

    if "cuda" in available_providers():
        pytest.skip("this machine has CUDA")
    proc = _slim_opt("-o", tmp_path / "q.onnx", "-p", "fold-bn", "--provider", "cuda")
    assert proc.returncode == 2 and "--provider cuda: not available" in proc.stderr


def test_cli_does_not_write_a_result_below_the_speed_bar(tmp_path):
    """--min-speedup sets the bar (default 0.95x the input); set above what any pass reaches,
    the result is refused: exit 1, nothing written, the pass that fell shortest named."""
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    proc = _slim_opt("-o", out, "-p", "fold-bn", "--min-speedup", "50", "--json", rep)
    assert proc.returncode == 1 and not out.exists()
    assert "not written" in proc.stderr and "'fold-bn' slowed it most" in proc.stderr
    assert json.loads(rep.read_text())["written"] is False
    allowed = _slim_opt("-o", out, "-p", "fold-bn", "--min-speedup", "50", "--allow-slower")
    assert allowed.returncode == 0 and out.exists()


def test_weight_bits_are_chosen_by_the_deployed_error(digits):
    """weight-bits=0 (default): where ORT's u8 x s8 kernel saturates (x86 without VNNI) both 8
    and 7 bits are tried as deployed and the closer one kept; elsewhere 8. Either way the
    choice is in the decided pipeline, and the deployed fidelity on held-out digits is high."""
    import re

    from graphslim.runtime import int8_weights_saturate

    x, _ = digits
    model = graphslim.load(MODEL, input_shapes=SHAPE)
    result = graphslim.optimize(model, "fold-bn,qdq", data={"image": x[:200]},
                                eval_data={"image": x[600:]})
    bits = result.report.records[-1].decided["weight_bits"]
    assert f"weight-bits={bits}" in result.report.decided
    if int8_weights_saturate():
        note = next(n for n in result.report.records[-1].notes if n.startswith("weight-bits"))
        sqnr = {int(b): float(v) for b, v in re.findall(r"(\d) bits (-?[\d.]+) dB", note)}
        assert bits == max(sqnr, key=sqnr.get)
    else:
        assert bits == 8
    assert result.report.fidelity.error.cosine > 0.99


def test_qdq_latency_choice_on_fx_says_it_chose_by_cost(digits):
    """The fx frontend's model is eager torch with fake-quantize modules, not what ORT runs:
    choose=latency cannot time it, and says so instead of pretending."""
    torch = pytest.importorskip("torch")
    from torch import nn

    x, _ = digits
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    model = graphslim.trace(net.eval(), torch.from_numpy(x[:1]))
    name = model.view().inputs[0]
    result = graphslim.optimize(model, "qdq{choose=latency}", data={name: x[:32]},
                                eval_data={name: x[500:600]})
    notes = result.report.records[-1].notes
    assert any("chose by cost" in n for n in notes)
    assert result.report.records[-1].stats["int8_conv"] == 1
    assert result.report.fidelity.data == "eval" and result.report.fidelity.error.cosine > 0.99
