"""The seed-package migration pages (docs/migration/gradinit.md, empirical-init.md,
gradnorm-pytorch.md, truegrad.md): run every snippet pair, check the claims each page makes about
it, and check that the outputs and numbers quoted on the page are what the snippets print now.

The snippets run in this process (``runpy``) with stdout captured, once each (cached); their
globals are kept, so a test can reuse what a snippet built (its model factory, its report). A
"theirs" snippet, and every comparison that needs it, is skipped when the peer package is missing;
the "ours" snippets need only gradxform.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "docs" / "migration" / "snippets"
PAGES = {
    "gradinit_": ROOT / "docs" / "migration" / "gradinit.md",
    "empirical_init_": ROOT / "docs" / "migration" / "empirical-init.md",
    "gradnorm_": ROOT / "docs" / "migration" / "gradnorm-pytorch.md",
    "truegrad_": ROOT / "docs" / "migration" / "truegrad.md",
}
PEER = {"gradinit_": "gradinit", "empirical_init_": "empirical_init", "gradnorm_": "gradnorm_pytorch",
        "truegrad_": "truegrad"}
_RUNS: dict[str, tuple[list[str], dict[str, Any]]] = {}

# a number not glued to a word or to another number ("0.6877-0.6879" is two positive numbers,
# "||g||_2" and "L/L0" hold none)
NUM = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def prefix_of(name: str) -> str:
    return next(p for p in PAGES if name.startswith(p))


def page(prefix: str) -> str:
    return PAGES[prefix].read_text()


def run(name: str) -> tuple[list[str], dict[str, Any]]:
    """(stdout lines, globals) of docs/migration/snippets/<name>.py, run once."""
    prefix = prefix_of(name)
    if name.endswith("_theirs"):
        pytest.importorskip(PEER[prefix], reason=f"{PEER[prefix]} is not installed (peer package of the migration page)")
    if name not in _RUNS:
        buf = io.StringIO()
        dtype = torch.get_default_dtype()
        try:
            with contextlib.redirect_stdout(buf):
                g = runpy.run_path(str(SNIPPETS / f"{name}.py"), run_name="__main__")
        finally:
            torch.set_default_dtype(dtype)
        _RUNS[name] = (buf.getvalue().splitlines(), g)
    return _RUNS[name]


def out(name: str) -> list[str]:
    return run(name)[0]


def nums(text: str) -> list[float]:
    return [float(x) for x in NUM.findall(text)]


def line(lines: list[str], start: str) -> list[float]:
    """The numbers on the one line that starts with ``start`` (the label's own numbers excluded)."""
    hits = [ln for ln in lines if ln.startswith(start)]
    assert len(hits) == 1, (start, lines)
    return nums(hits[0][len(start):])


def unit(token: str) -> float:
    """One unit of the last printed digit of a number as written (0 for an integer: exact)."""
    mant = token.lower().split("e")[0]
    if "." not in mant:
        return 0.0
    u = 10.0 ** -len(mant.split(".")[1])
    if "e" in token.lower():
        u *= 10.0 ** int(token.lower().split("e")[1])
    return u


def close_as_printed(quoted: str, measured: float) -> bool:
    """``quoted`` (a number as the page writes it) equals ``measured`` up to one unit of its last
    digit (float32 results may differ in the last digit on another machine), or 1e-6 relative."""
    return abs(float(quoted) - measured) <= max(unit(quoted) * 1.0000001, 1e-6 * abs(measured))


def prose(prefix: str, pattern: str) -> list[str]:
    """The numbers captured by ``pattern`` (one group per number) in the page's text."""
    m = re.search(pattern.replace(" ", r"\s+"), page(prefix), re.S)   # a space matches a line break too
    assert m, f"{PAGES[prefix].name}: the page no longer says {pattern!r}"
    return list(m.groups())


def all_snippets() -> list[str]:
    return sorted(p.stem for p in SNIPPETS.glob("*.py") if any(p.stem.startswith(x) for x in PAGES))


# --- every page includes its snippet pair and quotes what the snippets print ---------------------


@pytest.mark.parametrize("prefix", list(PAGES))
def test_page_includes_its_snippet_pair_side_by_side(prefix):
    text = page(prefix)
    files = [n for n in all_snippets() if n.startswith(prefix)]
    assert files == [prefix + "ours", prefix + "theirs"], files
    included = re.findall(r'--8<-- "docs/migration/snippets/([^"]+)\.py"', text)
    assert sorted(included) == files, (included, files)
    assert re.search(rf'<div class="grid" markdown>\n```python\n--8<-- "docs/migration/snippets/{prefix}theirs\.py"\n```\n'
                     rf'```python\n--8<-- "docs/migration/snippets/{prefix}ours\.py"\n```\n</div>', text), prefix
    for heading in ("## What differs and why", "## Mapping"):
        assert heading in text, (prefix, heading)
    # the gradxform side needs no peer package
    ours = (SNIPPETS / f"{prefix}ours.py").read_text()
    assert not re.search(rf"^\s*(import|from) {PEER[prefix]}\b", ours, re.M)


@pytest.mark.parametrize("name", all_snippets())
def test_quoted_output_is_what_the_snippet_prints(name):
    """The page's ```text title="<name>.py prints"``` block: the same lines, the same words, and
    every number equal up to one unit of its last printed digit."""
    printed = out(name)
    blocks = re.findall(rf'```text title="{name}\.py prints"\n(.*?)```', page(prefix_of(name)), re.S)
    assert len(blocks) == 1, f"{name}: expected one quoted output block"
    quoted = blocks[0].splitlines()
    assert len(quoted) == len(printed), (quoted, printed)
    for q, o in zip(quoted, printed):
        assert NUM.sub("#", q) == NUM.sub("#", o), (q, o)
        for a, b in zip(NUM.findall(q), nums(o)):
            assert close_as_printed(a, b), (q, o)


# --- gradinit --------------------------------------------------------------------------------------


def test_gradinit_simplified_equals_the_package_and_the_clip_ends_the_stall():
    theirs_out, theirs = run("gradinit_theirs")
    ours_out, ours = run("gradinit_ours")
    r1, r2, r3 = ours["r1"], ours["r2"], ours["r3"]
    # 1. the package's objective and plain Adam: the package's scales, every one of the 22
    assert len(theirs["scales"]) == 22 and set(theirs["scales"]) == set(r1.scales)
    for k, v in theirs["scales"].items():
        assert math.isclose(r1.scales[k], v, rel_tol=1e-5), (k, r1.scales[k], v)
    assert r1.method == "gradinit-simplified" and r3.method == "gradinit"
    assert r1.iterations == r2.iterations == r3.iterations == 60
    # the same start and the same end
    g0 = line(theirs_out, "||g||_2 at init:")[0]
    assert g0 > 1000 and math.isclose(line(ours_out, "||g||_2 at init:")[0], g0, rel_tol=1e-4)
    g_theirs = line(theirs_out, "||g||_2 after:")[0]
    first = line(ours_out, "package objective, no clip:")
    assert math.isclose(first[-1], g_theirs, rel_tol=1e-4)
    # the stall without a clip: every iteration on the norm branch, ||g|| far above gamma = 1
    assert r1.norm_branch_steps == 60 and g_theirs > 10.0
    hidden = [theirs["scales"][f"{i}.weight"] for i in range(0, 20, 2)]
    # with the clip (same objective): the norm branch ends, ||g|| under gamma, smaller scales
    assert r2.norm_branch_steps < 60 and r3.norm_branch_steps < 60
    g_clip = line(ours_out, "package objective, clip 1:")[-1]
    g_paper = line(ours_out, "paper objective, clip 1:")[-1]
    assert g_clip < 1.0 and g_paper < 1.0
    assert max(r2.scales[f"{i}.weight"] for i in range(0, 20, 2)) < min(hidden)
    # the numbers the prose quotes
    stall, g_after = prose("gradinit_", r"scales stall at about (\d\.\d+) with `\|\|g\|\|_2` still (\d+\.\d)")
    assert abs(float(stall) - max(hidden)) < 0.005 and close_as_printed(g_after, g_theirs)
    steps, gc, gp = prose("gradinit_", r"leaves the norm branch after (\d+) iterations and ends\s+at `\|\|g\|\|_2` = "
                                       r"(\d\.\d+); the paper's objective with the clip ends at (\d\.\d+)")
    assert int(steps) == r2.norm_branch_steps and close_as_printed(gc, g_clip) and close_as_printed(gp, g_paper)
    cells = prose("gradinit_", r"\((\d+) of (\d+) steps here, `‖g‖_2` (\d+\.\d) at the end\).*?"
                               r"(\d+) norm-branch steps, `‖g‖_2` (\d\.\d+)")
    assert [int(cells[0]), int(cells[1]), int(cells[3])] == [r1.norm_branch_steps, 60, r2.norm_branch_steps]
    assert close_as_printed(cells[2], g_theirs) and close_as_printed(cells[4], g_clip)


# --- empirical_init --------------------------------------------------------------------------------


def _ei_rows(lines):
    rows = {}
    for ln in lines:
        n = nums(ln)
        rows[int(n[0])] = n[1:]
    return rows


def test_empirical_init_pass_counts_and_pillar_one():
    ours = _ei_rows(out("empirical_init_ours"))
    assert sorted(ours) == [5, 9]
    for layers, (passes, rms_lo, rms_hi, fwd, bwd) in ours.items():
        # a fixed count at any depth, the same from outside (a forward hook) and in the report
        assert (passes, fwd, bwd) == (30, 30, 22), layers
        assert 0.94 <= round(rms_lo, 2) and round(rms_hi, 2) <= 1.06, (layers, rms_lo, rms_hi)
    assert len(out("empirical_init_ours")) == 2          # gradxform prints nothing of its own
    theirs = _ei_rows(out("empirical_init_theirs"))
    assert sorted(theirs) == [5, 9]
    for layers, (passes, rms_lo, rms_hi, printed) in theirs.items():
        assert passes == 10 * layers + 22, (layers, passes)
        # pillar 1 holds only roughly on the draw it returns: a wider spread than ours
        spread = max(-math.log(rms_lo), math.log(rms_hi))
        ours_spread = max(-math.log(ours[layers][1]), math.log(ours[layers][2]))
        assert spread > ours_spread, (layers, spread, ours_spread)
        assert printed > 10 * layers                      # its per-module report
    lo, hi, olo, ohi = prose("empirical_init_", r"RMS\s+between (\d\.\d+) and (\d\.\d+); the package's spread is wider "
                                                r"\((\d\.\d+) to (\d\.\d+) for 5 layers\)")
    assert float(lo) == round(min(r[1] for r in ours.values()), 2)
    assert float(hi) == round(max(r[2] for r in ours.values()), 2)
    assert abs(float(olo) - theirs[5][1]) < 0.006 and abs(float(ohi) - theirs[5][2]) < 0.006
    a, b = prose("empirical_init_", r"so (\d+) and (\d+) here, about ten per layer")
    assert [int(a), int(b)] == [theirs[5][0], theirs[9][0]]
    c, d = prose("empirical_init_", r"It also printed (\d+) and (\d+) lines")
    assert [int(c), int(d)] == [theirs[5][3], theirs[9][3]]


# --- gradnorm-pytorch ------------------------------------------------------------------------------


def _gn_rows(lines):
    # "alpha 1.5: step-0 |grad trunk[0].weight| 0.2056; weights ..." -> {1.5: [g0, w0, w1, r0, r1]}
    return {nums(ln)[0]: nums(ln.split("|")[-1]) for ln in lines}


def test_gradnorm_network_gradient_and_restoring_force_direction():
    ours_lines, ours = run("gradnorm_ours")
    rows = _gn_rows(ours_lines)
    # ours: the step-0 network gradient is that of L_0 + L_1 (both weights 1), by a plain backward
    trunk, heads, batches = ours["make"]()
    x, y = batches[0]
    ours["task_losses"](trunk, heads, x, y).sum().backward()
    true_g0 = float(trunk[0].weight.grad.norm())
    for alpha in (0.0, 1.5):
        assert math.isclose(rows[alpha][0], true_g0, rel_tol=1e-3), (rows[alpha][0], true_g0)
    # the paper's direction: task 0 trains fast, so its weight goes down
    g0, w0, w1, r0, r1 = rows[1.5]
    assert r0 < 0.1 and r1 > 1.0 and w0 < 1.0 < w1 and math.isclose(w0 + w1, 2.0, rel_tol=1e-3)

    theirs = _gn_rows(out("gradnorm_theirs"))
    # theirs: the GradNorm loss is back-propagated into the network as well
    ratio = theirs[1.5][0] / true_g0
    assert ratio > 1.2 and theirs[0.0][0] == theirs[1.5][0]
    (q_ratio,) = prose("gradnorm_", r"about (\d\.\d+) times as large")
    assert abs(float(q_ratio) - ratio) < 0.006
    # without the restoring force both only balance the norms: weights within 0.01
    assert abs(theirs[0.0][1] - rows[0.0][1]) < 0.01 and abs(theirs[0.0][1] - 1) < 0.1
    # with alpha = 1.5 the package moves the weights the other way (r^-alpha)
    t_g0, t_w0, t_w1, t_r0, t_r1 = theirs[1.5]
    assert t_w0 > 1.0 > t_w1 and t_r1 > 1.0
    # and, in this run, learns task 0 about ten times worse
    assert 7.0 < t_r0 / r0 < 13.0
    q = prose("gradnorm_", r"the weights end within\s+0\.01 of each other \((\d\.\d+) and (\d\.\d+) for task 0\)")
    assert close_as_printed(q[0], theirs[0.0][1]) and close_as_printed(q[1], rows[0.0][1])
    q = prose("gradnorm_", r"task 0 trains fast \(`L/L0` (\d\.\d+)\) and task 1 not at all \((\d\.\d+)\)")
    assert close_as_printed(q[0], r0) and close_as_printed(q[1], r1)
    q = prose("gradnorm_", r"ends at \((\d\.\d+), (\d\.\d+)\)\..*?to \((\d\.\d+), (\d\.\d+)\)\..*?`L/L0`\s+(\d\.\d+) against (\d\.\d+)")
    for a, b in zip(q, (w0, w1, t_w0, t_w1, t_r0, r0)):
        assert close_as_printed(a, b), (a, b)


# --- truegrad --------------------------------------------------------------------------------------


def _sgs(lines):
    v = line(lines, "S at step 0 (sum over each tensor):")
    return dict(zip(("0.weight", "0.bias", "2.weight", "2.bias"), v[1::2]))  # v = [0, S, 0, S, 2, S, 2, S]


def test_truegrad_statistic_graft_and_weight_decay():
    ours_lines, _ = run("truegrad_ours")
    theirs_lines, theirs = run("truegrad_theirs")
    s_ours, s_theirs = _sgs(ours_lines), _sgs(theirs_lines)
    # Linear weights: the same statistic; biases: truegrad.nn's is N = 32 times BackPACK's (and ours)
    for k in ("0.weight", "2.weight"):
        assert math.isclose(s_theirs[k], s_ours[k], rel_tol=1e-5), k
    for k in ("0.bias", "2.bias"):
        assert math.isclose(s_theirs[k] / s_ours[k], 32.0, rel_tol=1e-4), (k, s_theirs[k] / s_ours[k])
    label = "TGAdamW(graft={}), after 50 steps: loss on batch 0"
    # grafting cancels a per-tensor factor on S: the same run; without it the runs part
    assert abs(line(theirs_lines, label.format(True))[0] - line(ours_lines, label.format(True))[0]) <= 2e-6
    assert abs(line(theirs_lines, label.format(False))[0] - line(ours_lines, label.format(False))[0]) > 1e-3
    # weight decay: the package decays once per parameter with a gradient (4 here) per step
    decay = "decay factor of 0.weight after one step:"
    assert math.isclose(line(theirs_lines, decay)[0], 0.99 ** 4, rel_tol=2e-6)
    assert math.isclose(line(ours_lines, decay)[0], 0.99, rel_tol=2e-6)
    q = prose("truegrad_", r"the factor is `0\.99\^4` = (\d\.\d+)")
    assert close_as_printed(q[0], 0.99 ** 4)
    q = prose("truegrad_", r"runs part \(loss\s+(\d\.\d+) against (\d\.\d+)\)")
    assert close_as_printed(q[0], line(theirs_lines, label.format(False))[0])
    assert close_as_printed(q[1], line(ours_lines, label.format(False))[0])


def test_truegrad_without_graft_bias_steps_are_sqrt_n_too_small():
    """The page's claim: for the same gradients, the package's no-graft bias step is 1/sqrt(32) of
    ours (its bias statistic is 32 times too large), its weight step the same. First step."""
    _, ours = run("truegrad_ours")
    _, theirs = run("truegrad_theirs")
    import gradxform as gx

    steps = []
    for g, make_opt in ((theirs, lambda m: theirs["TGAdamW"](m.parameters(), lr=1e-2, weight_decay=0.0, graft=False)),
                        (ours, lambda m: gx.Optimizer(m.parameters(), gx.tg_adamw(lr=1e-2, weight_decay=0.0, graft=False)))):
        model, batches = g["make"]()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = make_opt(model)
        x, y = batches[0]
        if g is ours:
            with gx.track_sum_grad_squared(model) as stats:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step(sum_grad_squared=stats.sum_grad_squared)
        else:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        steps.append({k: (v.detach() - before[k]) for k, v in model.named_parameters()})
    theirs_step, ours_step = steps
    for k in ("0.weight", "2.weight"):
        torch.testing.assert_close(theirs_step[k], ours_step[k], rtol=1e-4, atol=1e-9)
    for k in ("0.bias", "2.bias"):
        torch.testing.assert_close(theirs_step[k], ours_step[k] / math.sqrt(32), rtol=1e-4, atol=1e-9)
    (q,) = prose("truegrad_", r"`sqrt\(32\)` = (\d\.\d+) times too small")
    assert close_as_printed(q, math.sqrt(32))
