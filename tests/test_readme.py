"""The README's commands work: its Python examples and its command-line examples are run."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_run():
    (ROOT / "out").mkdir(exist_ok=True)
    for code in _blocks("python"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 0, code + proc.stderr


def test_readme_cli_examples_run():
    (ROOT / "out").mkdir(exist_ok=True)
    commands = [c for block in _blocks("bash") for c in block.replace("\\\n", " ").splitlines()
                if c.startswith("python tools/")]
    assert len(commands) >= 5
    for cmd in commands:
        args = shlex.split(cmd)
        proc = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 0, cmd + proc.stderr


def test_demo_runs_and_keeps_accuracy():
    proc = subprocess.run([sys.executable, "tools/demo.py", "--out", "out/demo_test.onnx"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before, after = map(float, re.search(r"digits: ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert before > 0.95 and after == before
