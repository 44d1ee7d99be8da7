"""The examples run and do what they claim (needs scikit-learn for the digits data)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

# long by nature: end-to-end runs of the example scripts (subprocesses, trainings). Deselected by default (pyproject addopts);
# CI runs them with `pytest -m slow` (README, "Run the tests").
pytestmark = pytest.mark.slow

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


def test_two_ways_functional_and_optimizer_agree():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_ways.py"), "--epochs", "2", "--seed", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"two_ways.py failed:\n{proc.stdout}\n{proc.stderr}"
    match = re.search(r"max abs difference between \(a\) and \(b\) parameters: (\S+)", proc.stdout)
    assert match, f"no max-abs-difference line in the demo's output:\n{proc.stdout}"
    assert float(match.group(1)) < 1e-5, proc.stdout
    assert len(re.findall(r"^\s+\d+\s+\d", proc.stdout, flags=re.M)) == 2, proc.stdout  # one row per epoch


def test_heavy_tailed_noise_example_runs_and_reports_every_method():
    """A short run of the clipping example: every method trains (no divergence, accuracy well
    above chance) and the clip fractions it reads from the clippers' state are in [0, 100]%."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "heavy_tailed_noise.py"), "--seeds", "1", "--steps", "60"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}([\d.]+) \+- [\d.]+\s+([\d.]+) \+- [\d.]+\s+(\d+)/1\s+(\S+)$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)), int(m.group(4)), m.group(5))
    assert {"sgd", "global norm", "coordinate-wise", "autoclip q=0.1", "random norm", "clipped SSTM"} <= set(rows)
    for name, (loss, acc, diverged, clipped) in rows.items():
        assert diverged == 0 and loss < 2.3 and acc > 0.5, (name, rows[name])
        if clipped != "-":
            assert 0 <= float(clipped.rstrip("%")) <= 100


def test_truegrad_digits_smoke_trains_all_three_optimizers():
    """The TrueGrad example's --smoke run: every optimizer's full-train loss falls well below its
    initial value with accuracy far above chance, and the engine takes its fast path for every
    param of the CNN (conv2d and linear rules, no fallback)."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "truegrad_digits.py"), "--smoke"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    initial = re.search(r"^initial train loss ([\d.]+)$", out.stdout, flags=re.M)
    assert initial, out.stdout
    initial_loss = float(initial.group(1))
    assert 2.0 < initial_loss < 2.6, out.stdout  # ~ln(10) at init
    methods = re.search(r"^engine methods: (.*)$", out.stdout, flags=re.M)
    assert methods and "fast:conv2d" in methods.group(1) and "fast:linear" in methods.group(1), out.stdout
    assert "fallback" not in methods.group(1), out.stdout
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}([\d.e+-]+)\s+([\d.e+-]+) \+- \S+\s+([\d.]+) \+- \S+\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    assert set(rows) == {"AdamW", "TG-AdamW", "TG-AdamW no-graft"}, out.stdout
    for name, (lr, loss, acc, grad_ms, step_ms) in rows.items():
        assert lr == 3e-3, (name, rows[name])
        assert loss < 0.5 * initial_loss, (name, rows[name])
        assert acc > 0.7, (name, rows[name])
        assert 0 < grad_ms <= step_ms, (name, rows[name])


def test_gradnorm_toy_smoke_balances_the_tasks(tmp_path):
    """The GradNorm toy example's --smoke run (60 steps, tiny data, T = 2 and T = 10): for both T,
    GradNorm's weights sum to T and shrink the spread max G / min G well below equal weights'; for
    T = 2 the sigma = 1 task gets the larger weight, for T = 10 the weights fall with sigma; with
    --plot (when matplotlib is installed) both figures are written."""
    prefix = tmp_path / "toy"
    out = subprocess.run([sys.executable, str(EXAMPLES / "gradnorm_toy.py"), "--smoke", "--plot", str(prefix)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    blocks = re.split(r"^== ", out.stdout, flags=re.M)[1:]
    assert [int(re.match(r"T = (\d+)", b).group(1)) for b in blocks] == [2, 10], out.stdout
    for block, t in zip(blocks, (2, 10)):
        rows = dict(re.findall(r"^(equal weights|GradNorm)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s", block, flags=re.M))
        assert set(rows) == {"equal weights", "GradNorm"}, block
        spread_eq, spread_gn = float(rows["equal weights"]), float(rows["GradNorm"])
        assert spread_gn >= 1.0 and spread_eq > 5 * spread_gn, block
        losses = [float(v) for v in re.findall(r"^(?:equal weights|GradNorm)\s+[\d.]+\s+([\d.]+)\s", block, flags=re.M)]
        assert all(0.5 * t < v < 1.5 * t for v in losses), block  # finite, near T after 60 short steps
        w = [float(v) for v in re.search(r"^GradNorm final weights: (.*)$", block, flags=re.M).group(1).split()]
        assert len(w) == t and abs(sum(w) - t) < 1e-3 and min(w) > 0, block
        rho = float(re.search(r"^Spearman\(w, sigma\): (\S+)$", block, flags=re.M).group(1))
        if t == 2:
            assert w[0] > 1.5 > 0.5 > w[1], block  # sigma = (1, 100)
        else:
            assert rho < -0.7, block
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for t in (2, 10):
        assert (tmp_path / f"toy_T{t}.png").stat().st_size > 10_000


def test_deep_mlp_init_smoke_rescues_both_deep_mlps(tmp_path):
    """The init example's --smoke run (seed 0, 3 epochs, 80 GradInit iterations): the 10-layer
    bad-init baseline diverges while GradInit's run stays finite after ~55 norm-branch steps that
    shrink every weight tensor; the 20-layer default-init baseline stays at chance at all three
    lrs while empirical init's run learns, with a pass count that does not grow with depth."""
    plot = tmp_path / "init.png"
    out = subprocess.run([sys.executable, str(EXAMPLES / "deep_mlp_init.py"), "--smoke", "--plot", str(plot)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    gi = re.search(r"^\s+0\s+([\d.]+)%( NaN)?\s+([\d.]+)%( NaN)?\s+(\d+)\s+(\S+)\s+(\d+)/(\d+)\s+\S+\s+\S+\s+([\d.]+)-([\d.]+)$",
                   out.stdout, flags=re.M)
    assert gi, out.stdout
    base_acc, base_nan, gi_acc, gi_nan, steps, gnorm, fwd, bwd, w_lo, w_hi = gi.groups()
    assert base_nan and float(base_acc) <= 15, out.stdout  # diverged
    assert not gi_nan and float(gnorm) <= 1.0, out.stdout  # finite, ||g|| below gamma
    assert 30 <= int(steps) <= 80 and int(fwd) == int(bwd) == 160, out.stdout
    assert 0.2 <= float(w_lo) <= float(w_hi) <= 0.5, out.stdout
    ei = re.search(r"^\s+0\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+(\d+)/(\d+)\s", out.stdout, flags=re.M)
    assert ei, out.stdout
    *base, ei_acc = [float(v) for v in ei.groups()[:4]]
    assert all(b <= 15 for b in base) and ei_acc > max(base) + 5, out.stdout
    assert int(ei.group(6)) == 22 and int(ei.group(5)) <= 30, out.stdout  # 2 + upd_iters backward passes
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot.stat().st_size > 10_000


def test_ensemble_digits_smoke_vmapped_loop_matches_separate_loops():
    """The ensemble example's --smoke run (4 MLPs, 20 Adam steps, lrs 1e-4 .. 1e-1): one row per
    model; the vmapped and the separate loops agree (params to float32 rounding, so the same test
    accuracy); the lr 1e-4 model stays near chance while the larger lrs learn; the mean train loss
    falls."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "ensemble_digits.py"), "--smoke"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\s+(\d+)\s+([\d.e+-]+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.e+-]+)$", out.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], out.stdout
    lrs = [float(r[1]) for r in rows]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-1), out.stdout
    for _, _, acc_vmap, acc_sep, diff in rows:
        assert float(diff) < 1e-4, out.stdout
        assert acc_vmap == acc_sep, out.stdout
    accs = [float(r[2]) for r in rows]
    assert accs[0] < 30 and min(accs[2:]) > 80, out.stdout
    m = re.search(r"^mean train loss over the models: ([\d.]+) at step 1 -> ([\d.]+) at step 20$", out.stdout, flags=re.M)
    assert m and float(m.group(2)) < 0.7 * float(m.group(1)), out.stdout


def test_learned_lr_smoke_moves_the_lr_up_from_a_poor_start():
    """The learned-lr example's --smoke run (SGD with momentum, 20 outer steps of 5 unrolled inner
    steps from lr 1e-4): every hypergradient is finite; the lr rises monotonically by over 30x; the
    validation loss falls well below its start and below the fixed-lr-1e-4 run's."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "learned_lr.py"), "--smoke"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.e+-]+)\s+([\d.]+)\s+([\d.e+-]+)$", out.stdout, flags=re.M)
    assert len(rows) >= 5, out.stdout
    lrs = [float(r[2]) for r in rows]
    vals = [float(r[3]) for r in rows]
    assert lrs[0] == pytest.approx(1e-4), out.stdout
    assert all(b > a for a, b in zip(lrs, lrs[1:])), out.stdout
    assert all(abs(float(r[4])) < 1e3 for r in rows), out.stdout  # finite hypergradients (no nan)
    m = re.search(r"^lr: ([\d.e+-]+) -> ([\d.e+-]+) ", out.stdout, flags=re.M)
    assert m and float(m.group(2)) > 30 * float(m.group(1)), out.stdout
    learned = re.search(r"^\s+online, learned lr\s+val loss ([\d.]+)\s+test acc ([\d.]+)%$", out.stdout, flags=re.M)
    fixed = re.search(r"^\s+fixed lr 1\.00e-04\s+val loss ([\d.]+)", out.stdout, flags=re.M)
    assert learned and fixed, out.stdout
    assert float(learned.group(1)) < 0.6 * vals[0] and float(learned.group(1)) < 0.6 * float(fixed.group(1)), out.stdout
    assert float(learned.group(2)) > 50, out.stdout


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_distributed_example_matches_one_process_and_resumes_exactly(mode):
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.4")
    out = subprocess.run([sys.executable, str(EXAMPLES / "distributed_digits.py"), "--mode", mode, "--smoke"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    diff = float(re.search(r"max abs param difference, 2 ranks vs one process: (\S+)", out.stdout).group(1))
    hist = float(re.search(r"norm history: (\S+)", out.stdout).group(1))
    assert diff < 1e-5 and hist < 1e-5, out.stdout
    assert "bit-exact = True" in out.stdout, out.stdout


def test_showcase_demo_all_four_families():
    """The README's demo: GradInit rescues a deep net at 2x He std, GradNorm moves the weights,
    AutoClip clips some steps, TG-AdamW trains; the functional loop and gx.Optimizer agree."""
    demo = load_example("demo")
    res = demo.main(["--epochs", "12", "--seed", "0"])
    assert res["diff"] < 1e-6
    assert res["acc"] >= 0.85 and res["mae"] < 1.5, res
    assert res["acc_base"] <= 0.2 and res["mae_base"] > 10, res  # the same chain without GradInit
    report = res["report"]
    assert 0 < report.norm_branch_steps < report.iterations  # both GradInit branches
    assert min(report.scales.values()) >= 0.01
    w = res["rows"][-1]["w"]
    assert abs(sum(w) - 2.0) < 1e-9 and w[0] > w[1]  # renormalised to T; the MSE task is turned down
    assert 0.0 < res["clip_fraction"] < 1.0
    assert len(res["rows"]) == 12


def test_every_example_has_a_smoke_test():
    """No example rots: each script under examples/ is run by a test in this file."""
    source = Path(__file__).read_text()
    scripts = {p.stem for p in EXAMPLES.glob("*.py")} - {"digits_data"}  # a shared data module
    missing = [s for s in sorted(scripts) if f'"{s}.py"' not in source and f'"{s}"' not in source]
    assert not missing, f"add a smoke test for: {missing}"
