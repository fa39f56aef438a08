"""The wheel installs one namespace (`graphslim`, nothing else at the top of site-packages),
carries its data files, and its console scripts work from any directory without torch imported."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(ROOT)], check=True,
                   capture_output=True)
    (found,) = out.glob("*.whl")
    return found


def test_wheel_has_one_namespace_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"graphslim", next(t for t in tops if t.endswith(".dist-info"))}
    assert next(t for t in tops if t.endswith(".dist-info")).startswith("graphslim_engine-")
    for f in ("graphslim/data/demo_cnn.onnx", "graphslim/data/mnist_test.npz",
              "graphslim/benchmarks/matrix.toml", "graphslim/passes/fold_bn.py",
              "graphslim/tools/slim_opt.py"):
        assert f in names
    assert not any(n.startswith("graphslim/tests") for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"fold-bn = graphslim.passes.fold_bn" in entry
    assert b"slim-opt = graphslim.tools.slim_opt:main" in entry


def test_installed_wheel_runs_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import sys, graphslim; from graphslim.pass_base import registered_passes; "
            "names = sorted(registered_passes()); "
            "assert graphslim.__file__.startswith(sys.argv[1]), graphslim.__file__; "
            "assert 'fold-bn' in names and 'qdq' in names, names; "
            "assert 'torch' not in sys.modules; print(len(names))")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=work, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    demo = subprocess.run([str(target / "bin" / "slim-demo"), "--out", "x.onnx"], cwd=work,
                          env=env, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert (work / "x.onnx").exists()
