"""Seeded mutation fuzzing of the command-line path (hypothesis draws mutation kinds and seeds,
derandomized so every run is the same): whatever the file, slim-opt returns an exit code (0, 1
or 2, never a traceback or an internal error), never changes its input, and a model it writes
passes onnx.checker, loads in ONNX Runtime and, for fold-bn, matches the input model's
outputs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import graphslim  # noqa: E402
from graphslim.benchmarks.mutants import KINDS, mutate  # noqa: E402
from graphslim.tools import slim_opt  # noqa: E402

DEMO = pathlib.Path(graphslim.__file__).parent / "data" / "demo_cnn.onnx"


def _ort_outputs(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_mutants_never_crash_or_emit_invalid_models(kind, seed, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    src, out = work / "in.onnx", work / "out.onnx"
    src.write_bytes(mutate(DEMO.read_bytes(), kind, seed))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = slim_opt.main([str(src), "-o", str(out), "-p", "fold-bn",
                            "--input-shape", "image:1,1,28,28", "--no-timing"])
    assert rc in (0, 1, 2), f"{kind}/{seed}: rc {rc}: {err.getvalue()}"
    assert "Traceback" not in err.getvalue()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    if rc != 0:
        assert err.getvalue().strip(), "a refusal says why"
        return
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(seed).standard_normal((1, 1, 28, 28)).astype(np.float32)
    name = model.graph.input[0].name
    try:
        ref = _ort_outputs(src, {name: x})
    except Exception:  # the mutant ran on the seeded inputs the tool used, not on these
        return
    got = _ort_outputs(out, {name: x})
    for r, g in zip(ref, got):
        finite = np.isfinite(r)
        np.testing.assert_allclose(g[finite], r[finite], rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(r[finite]).max(initial=0))))
