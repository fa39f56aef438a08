"""The README's commands work as written: its Python examples and its command-line examples run
from the clone's root through the shell, with the user's PATH (`.venv/bin/...` as the README
writes them, nothing activated), and from another directory."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VENV_BIN = ROOT / ".venv" / "bin"

pytestmark = pytest.mark.skipif(not (VENV_BIN / "slim-opt").exists(),
                                reason="the README's commands use the .venv that make creates")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _shell(cmd: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, env=env)


def _cli_commands() -> list[str]:
    return [c for block in _blocks("bash") for c in block.replace("\\\n", " ").splitlines()
            if c.startswith(".venv/bin/")]


def test_readme_python_examples_run():
    (ROOT / "out").mkdir(exist_ok=True)
    for code in _blocks("python"):
        proc = _shell(".venv/bin/python - <<'PYEOF'\n" + code + "PYEOF\n", ROOT)
        assert proc.returncode == 0, code + proc.stderr


def test_readme_cli_examples_run():
    (ROOT / "out").mkdir(exist_ok=True)
    commands = _cli_commands()
    assert len(commands) >= 5
    for cmd in commands:
        proc = _shell(cmd, ROOT)
        assert proc.returncode == 0, cmd + proc.stderr


def test_console_scripts_work_from_another_directory(tmp_path):
    """The installed scripts find their packaged files (the demo model, the harness matrix)
    wherever they are started."""
    demo = _shell(f"{VENV_BIN}/slim-demo --out demo.onnx", tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "demo.onnx").exists()
    listed = _shell(f"{VENV_BIN}/slim-benchmark --quick --models none-such", tmp_path)
    assert "none-such" in listed.stderr + listed.stdout and "Traceback" not in listed.stderr


def test_demo_compresses_and_keeps_accuracy(tmp_path):
    """The demo's result on the 800 held-out digits it was not calibrated on: accuracy within a
    point, 2x fewer MACs at least, a smaller file; its latency figures are written (the speed
    ratio itself is a benchmark target, not asserted here)."""
    report = tmp_path / "demo.json"
    proc = _shell(f".venv/bin/slim-demo --out out/demo_test.onnx --json {report}", ROOT)
    assert proc.returncode == 0, proc.stderr
    fig = json.loads(report.read_text())
    assert fig["accuracy_before"] > 0.97 and fig["eval_samples"] == 800
    assert fig["accuracy_after"] >= fig["accuracy_before"] - 0.01
    assert fig["macs_after"] * 2 <= fig["macs_before"]
    assert fig["bytes_after"] * 4 <= fig["bytes_before"]
    assert fig["latency_ms_before"] > 0 and fig["latency_ms_after"] > 0 and fig["cpu"]
    before, after = map(float, re.search(r"digits \(not calibrated on\): ([\d.]+) -> ([\d.]+)",
                                         proc.stdout).groups())
    assert (before, after) == (round(fig["accuracy_before"], 4), round(fig["accuracy_after"], 4))
