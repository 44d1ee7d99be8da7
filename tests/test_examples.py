"""The examples run and do what they claim (needs scikit-learn for the digits data)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the examples train on scikit-learn's digits data set")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    path = EXAMPLES / f"{name}.py"
    if str(EXAMPLES) not in sys.path:  # the examples import their shared digits_data module
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"gradxform_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_functional_digits_learns():
    result = load_example("functional_digits").train(epochs=10, seed=0)
    assert result["train_acc"] > 0.90, result
    assert result["test_acc"] > 0.85, result
    assert len(result["losses"]) == 10
    assert result["losses"][-1] < result["losses"][0], result["losses"]


def test_demo_functional_and_optimizer_agree():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--epochs", "2", "--seed", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"demo.py failed:\n{proc.stdout}\n{proc.stderr}"
    match = re.search(r"max abs difference between \(a\) and \(b\) parameters: (\S+)", proc.stdout)
    assert match, f"no max-abs-difference line in the demo's output:\n{proc.stdout}"
    assert float(match.group(1)) < 1e-5, proc.stdout
    assert len(re.findall(r"^\s+\d+\s+\d", proc.stdout, flags=re.M)) == 2, proc.stdout  # one row per epoch
