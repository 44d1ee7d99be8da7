"""The README's first snippet (the functional step) and its adapter snippet (``gx.Optimizer``) give
the same numbers on this torch as on torch 2.13, to float32 rounding. CI runs this on the floor
torch (2.1) too, against the numbers stored from 2.13 in tests/data/readme_numbers.json.

Regenerate the stored numbers (on torch 2.13 only)::

    PYTHONPATH=$PWD python tests/test_readme_numbers.py --regenerate
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "tests" / "data" / "readme_numbers.json"


def _snippets() -> tuple[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    first = blocks[0]
    adapter = next(b for b in blocks if "gx.Optimizer(" in b)
    return first, adapter


def _summary(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """The first 8 entries and the sum of each tensor, as float64 numbers."""
    return {k: [float(x) for x in v.detach().reshape(-1)[:8]] + [float(v.detach().double().sum())]
            for k, v in sorted(tensors.items())}


def compute() -> dict[str, dict[str, list[float]]]:
    """Run the two snippets (seeded, in a temporary directory for the checkpoint they write)."""
    first, adapter = _snippets()
    ns: dict = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            torch.manual_seed(0)
            exec(compile(first, "README.md[first]", "exec"), ns)
            initial = {k: v.detach().clone() for k, v in ns["model"].named_parameters()}
            # the snippet's step has lr = 0 (the warmup's first value): its last three lines,
            # the step, run 5 more times so that the comparison is of real AdamW updates
            step = "\n".join(first.strip().splitlines()[-3:])
            for _ in range(5):
                exec(compile(step, "README.md[first, step]", "exec"), ns)
            functional = dict(ns["params"])
            exec(compile(adapter, "README.md[adapter]", "exec"), ns)
            adapted = {k: v.detach().clone() for k, v in ns["model"].named_parameters()}
        finally:
            os.chdir(cwd)
    return {"inputs": _summary({**{"init." + k: v for k, v in initial.items()}, "x": ns["x"]}),
            "functional_step": _summary(functional), "adapter_step": _summary(adapted)}


def test_readme_snippets_give_the_stored_numbers():
    stored = json.loads(STORED.read_text())
    got = compute()
    # same random inputs first: otherwise a difference would not be the transforms'
    for part in ("inputs", "functional_step", "adapter_step"):
        assert got[part].keys() == stored[part].keys(), part
        for k in stored[part]:
            torch.testing.assert_close(torch.tensor(got[part][k]), torch.tensor(stored[part][k]),
                                       rtol=2e-6, atol=1e-6, msg=lambda m, k=k, part=part: f"{part}/{k}: {m}")
    # the steps moved the params (the comparison is of real updates)
    assert got["functional_step"]["0.weight"] != got["inputs"]["init.0.weight"]
    assert got["adapter_step"]["0.weight"] != got["functional_step"]["0.weight"]


if __name__ == "__main__":
    if "--regenerate" in sys.argv:
        if not torch.__version__.startswith("2.13"):
            sys.exit(f"regenerate on torch 2.13 (this is {torch.__version__})")
        STORED.write_text(json.dumps({"torch": torch.__version__, **compute()}, indent=1) + "\n")
        print("wrote", STORED)
