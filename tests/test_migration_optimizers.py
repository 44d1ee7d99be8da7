"""The migration pages (docs/migration/torch-optim.md, torchopt.md, torch-clip.md): run every
snippet pair, check the claims each page makes about it, and check that the outputs quoted on the
page are what the snippets print now.

The snippets run in this process (``runpy``) with stdout captured, once each; a snippet that
changes the default dtype gets it restored. The torchopt and torch-clip pairs are skipped when the
peer package is missing.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import re
import runpy
from pathlib import Path

import pytest
import torch
from helpers import needs

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "docs" / "migration" / "snippets"
PAGES = {
    "torch_optim_": ROOT / "docs" / "migration" / "torch-optim.md",
    "torchopt_": ROOT / "docs" / "migration" / "torchopt.md",
    "torch_clip_": ROOT / "docs" / "migration" / "torch-clip.md",
}
PEER = {"torchopt_": "torchopt", "torch_clip_": "torch_clip"}
_OUT: dict[str, list[str]] = {}


def prefix_of(name: str) -> str:
    return next(p for p in PAGES if name.startswith(p))


def page(prefix: str) -> str:
    return PAGES[prefix].read_text()


def run(name: str) -> list[str]:
    """stdout lines of docs/migration/snippets/<name>.py (cached)."""
    prefix = prefix_of(name)
    if prefix in PEER:
        pytest.importorskip(PEER[prefix], reason=f"{PEER[prefix]} is not installed (peer package of the migration page)")
    if name not in _OUT:
        buf = io.StringIO()
        dtype = torch.get_default_dtype()
        try:
            with contextlib.redirect_stdout(buf):
                runpy.run_path(str(SNIPPETS / f"{name}.py"), run_name="__main__")
        finally:
            torch.set_default_dtype(dtype)
        _OUT[name] = buf.getvalue().splitlines()
    return _OUT[name]


NUM = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def nums(line: str) -> list[float]:
    return [float(x) for x in NUM.findall(line)]


def value(lines: list[str], label: str) -> str:
    """The text after ``label`` on the line that starts with it."""
    hits = [ln[len(label):] for ln in lines if ln.startswith(label)]
    assert len(hits) == 1, (label, lines)
    return hits[0].strip()


def num_after(lines: list[str], label: str, index: int = 0) -> float:
    return nums(value(lines, label))[index]


def list_after(lines: list[str], label: str):
    return ast.literal_eval(value(lines, label))


def sci(x: float) -> str:
    """One significant digit as the pages' prose writes it: 4e-6."""
    m, e = f"{x:.0e}".split("e")
    return f"{m}e{int(e)}"


def all_snippets() -> list[str]:
    return sorted(p.stem for p in SNIPPETS.glob("*.py") if any(p.stem.startswith(x) for x in PAGES))


# --- every page includes its snippets and quotes what they print -------------------------------------


@pytest.mark.parametrize("prefix", list(PAGES))
def test_page_includes_all_its_snippets(prefix):
    text = page(prefix)
    included = re.findall(r'--8<-- "docs/migration/snippets/([^"]+)\.py"', text)
    files = [n for n in all_snippets() if n.startswith(prefix)]
    assert sorted(included) == files, (included, files)
    # every pair sits in a grid: the theirs file right before the ours file
    for name in files:
        if name.endswith("_theirs"):
            ours = name[: -len("theirs")] + "ours"
            assert re.search(rf'<div class="grid" markdown>\n```python\n--8<-- "docs/migration/snippets/{name}\.py"\n```\n'
                             rf'```python\n--8<-- "docs/migration/snippets/{ours}\.py"\n```\n</div>', text), name


# the torch.optim pair shows torch.amp.GradScaler("cpu")
_SCALER = {"torch_optim_ours", "torch_optim_theirs"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs("amp_gradscaler_cpu")) if n in _SCALER else n
                                  for n in all_snippets()])
def test_quoted_output_is_what_the_snippet_prints(name):
    """The page's ```text title="<name>.py prints"``` block equals the output: the same text, and
    numbers equal to 1e-6 relative (float32 results may differ in the last printed digit on
    another machine)."""
    out = run(name)
    blocks = re.findall(rf'```text title="{name}\.py prints"\n(.*?)```', page(prefix_of(name)), re.S)
    assert len(blocks) == 1, f"{name}: expected one quoted output block"
    quoted = blocks[0].splitlines()
    assert len(quoted) == len(out), (quoted, out)
    for q, o in zip(quoted, out):
        assert NUM.sub("#", q) == NUM.sub("#", o), (q, o)
        for a, b in zip(nums(q), nums(o)):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (q, o)


# --- torch.optim ---------------------------------------------------------------------------------------


@needs("amp_gradscaler_cpu")
def test_torch_optim_pair_equal_to_float32_rounding():
    theirs, ours, func = run("torch_optim_theirs"), run("torch_optim_ours"), run("torch_optim_functional")
    for other in (ours, func):
        assert math.isclose(num_after(other, "loss after 60 steps:"), num_after(theirs, "loss after 60 steps:"),
                            rel_tol=1e-6)
        for a, b in zip(list_after(other, "first weights:"), list_after(theirs, "first weights:")):
            assert abs(a - b) < 3e-7
    text = page("torch_optim_")
    assert "(differences of\nabout 1e-7)" in text and "within 2e-7 of both runs" in text


@needs("amp_gradscaler_cpu")
def test_torch_optim_state_layout_and_torch_state_dict_into_the_twin():
    theirs, ours = run("torch_optim_theirs"), run("torch_optim_ours")
    assert list_after(theirs, "state of param 0:") == list_after(ours, "state of param 0:") == ["exp_avg", "exp_avg_sq", "step"]
    assert list_after(ours, "group 0's own state:") == ["1/count"]
    gap = num_after(ours, "torch.optim.AdamW state dict into gx.adamw, 10 more steps: max |param difference|")
    assert gap < 1e-6  # float32 rounding: the two continue the same run
    assert f"(above: {sci(gap)} after 10 steps, float32 rounding)" in page("torch_optim_")


def test_torch_optim_clip_epsilon_explains_the_difference():
    out = run("torch_optim_clip_eps")
    clipped = int(num_after(out, "steps where the clip binds:"))
    with_eps = num_after(out, "max |param difference|, clip_grad_norm_:")
    exact = num_after(out, "max |param difference|, exact clip:")
    assert 0 < clipped < 60
    assert 1e-7 < with_eps < 1e-5 and exact < 1e-13
    text = page("torch_optim_")
    assert f"float64 params {sci(with_eps)} apart, or below 1e-14 with the same rule" in text and exact < 1e-14
    assert f"over the {clipped} clipped steps" in text


# --- torchopt ---------------------------------------------------------------------------------------------


def test_torchopt_functional_pair_equal():
    theirs, ours = run("torchopt_functional_theirs"), run("torchopt_functional_ours")
    lt, lo = num_after(theirs, "loss after 50 steps:"), num_after(ours, "loss after 50 steps:")
    rel = abs(lt - lo) / abs(lo)
    assert rel < 1e-5
    assert f"the losses agree to {sci(rel)} relative" in page("torchopt_")
    for a, b in zip(list_after(theirs, "first weights:"), list_after(ours, "first weights:")):
        assert abs(a - b) < 1e-6


def test_torchopt_meta_adam_hypergradient():
    theirs, ours = run("torchopt_meta_theirs"), run("torchopt_meta_ours")
    val64, hg64 = nums(value(theirs, "with float64 default dtype:"))
    val32, hg32 = nums(theirs[0])
    val, hg = nums(ours[0])
    fd = num_after(ours, "central finite difference:")
    assert math.isclose(val64, val, rel_tol=1e-9) and math.isclose(hg64, hg, rel_tol=1e-8)  # "all 10 printed digits"
    assert f"{val64:.10f}" == f"{val:.10f}" and f"{hg64:.10f}" == f"{hg:.10f}"
    assert abs(hg - fd) / abs(fd) < 5e-9
    assert 1e-6 < abs(hg32 - hg) / abs(hg) < 1e-4 and 1e-9 < abs(val32 - val) / val < 1e-7
    text = page("torchopt_")
    assert f"finite difference to {sci(abs(hg - fd) / abs(fd))} relative" in text
    assert f"({hg32:.8f} against\n{hg:.8f})" in text


def test_torchopt_hypergradient_through_the_clip():
    theirs, ours = run("torchopt_clip_theirs"), run("torchopt_clip_ours")
    vt, ht = nums(theirs[0])
    vo, ho = nums(ours[0])
    fd = num_after(ours, "central finite difference:")
    assert abs(ho - fd) / abs(fd) < 1e-6
    err = abs(ht - fd) / abs(fd)
    assert err > 0.1
    text = page("torchopt_")
    assert f"torchopt's hypergradient is {round(100 * err)}%\noff" in text
    assert f"{round(100 * err)}% hypergradient error above" in text
    assert f"The losses agree to {sci(abs(vt - vo) / vo)} relative (the clip epsilon again)" in text


def test_torchopt_class_and_compile():
    theirs, ours = run("torchopt_torch_theirs"), run("torchopt_torch_ours")
    assert value(theirs, "a torch.optim.Optimizer:") == "False" and value(ours, "a torch.optim.Optimizer:") == "True"
    assert value(theirs, "CosineAnnealingLR:") == "TypeError: Adam is not an Optimizer"
    assert math.isclose(num_after(ours, "CosineAnnealingLR: lr after one step"),
                        1e-2 * (1 + math.cos(math.pi / 60)) / 2, rel_tol=1e-6)
    assert value(theirs, "torch.compile(fullgraph=True):").startswith("Unsupported")
    assert value(ours, "torch.compile(fullgraph=True):") == "compiled == eager: True"


def test_torchopt_update_is_in_place_by_default():
    """The table's claim: torchopt's chain(clip_grad_norm, sgd) returns the caller's gradient
    tensors, overwritten; gradxform's update leaves them alone."""
    torchopt = pytest.importorskip("torchopt", reason="torchopt is not installed")
    import gradxform as gx

    for make, kwargs in ((lambda: torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.sgd(0.1)), {}),
                         (lambda: gx.chain(gx.clip_by_global_norm(1.0), gx.sgd(0.1)), None)):
        tx = make()
        params = {"w": torch.ones(2)}
        grads = {"w": torch.tensor([3.0, 4.0])}
        if kwargs is not None:
            u, _ = tx.update(grads, tx.init(params), params=params)
            assert u["w"] is grads["w"]
            torch.testing.assert_close(grads["w"], torch.tensor([-0.06, -0.08]))
        else:
            u, _ = tx.update(grads, tx.init(params), params)
            assert u["w"] is not grads["w"]
            torch.testing.assert_close(grads["w"], torch.tensor([3.0, 4.0]))
            torch.testing.assert_close(u["w"], torch.tensor([-0.06, -0.08]))


# --- torch-clip ---------------------------------------------------------------------------------------


def test_torch_clip_sgd_rules():
    theirs, ours = run("torch_clip_sgd_theirs"), run("torch_clip_sgd_ours")
    m = "norm, level 1.0, momentum 0.9:"
    assert list_after(theirs, m) == [[-0.6, -0.8], [-2.7, -3.7]]
    assert list_after(ours, m) == [[-0.6, -0.8], [-0.54, -0.82]]
    c = "coordinate_wise, level 2.0:"
    (t,) = list_after(theirs, c)
    assert list_after(ours, c) == [[-2.0, 2.0]]
    assert 0 < 2.0 - abs(t[0]) < 1e-8 and 0 < 2.0 - abs(t[1]) < 1e-8 and t[0] == -1.9999999933
    i = "norm, level 2 (an int):"
    assert list_after(theirs, i) == [[-0.6, -0.8]] and list_after(ours, i) == [[-1.2, -1.6]]
    assert list_after(theirs, "linear_rand_norm, level 1.0, default beta:") == [[-3.0, -4.0]] * 3
    assert value(ours, "linear_rand_norm, level 1.0, no beta:").startswith("ValueError: beta is required")
    assert list_after(ours, "linear_rand_norm, level 1.0, beta 0.5:") == [[-0.6, -0.8]] * 3
    text = page("torch_clip_")
    assert f"`0.5 ** 0.2` = {0.5 ** 0.2:.2f}" in text
    assert "(-2.7, -3.7) vs (-0.54, -0.82)" in text and "-1.9999999933 vs -2.0" in text
    assert "(-0.6, -0.8) vs (-1.2, -1.6)" in text


def test_torch_clip_autoclip():
    theirs, ours = run("torch_clip_autoclip_theirs"), run("torch_clip_autoclip_ours")
    assert theirs[:-1] == ["Here!"] * 6
    assert list_after(theirs, "clip factors:") == [1.0, 1.0, 1.0, 1.0, 1.0, 0.25]
    assert list_after(ours, "clip factors:") == [1.0, 1.0, 0.5, 1.0, 1.0, 0.25]
    assert "factor 1.0 vs 0.5 at step 3" in page("torch_clip_") and "6 lines vs none" in page("torch_clip_")


def test_torch_clip_restarts():
    theirs, ours = run("torch_clip_restarts_theirs"), run("torch_clip_restarts_ours")
    assert theirs == ["after the restart: a [-1.5, 0.0] b [9.0]"]
    assert ours == ["after the restart: a [-1.0, 0.0] b [6.0]"]  # the mean of 3 iterates
    assert "a (-1.5, 0), b 9 vs a (-1, 0), b 6" in page("torch_clip_")
