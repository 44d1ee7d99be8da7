"""GradInit (Zhu et al., NeurIPS 2021, arXiv:2102.08098, Algorithm 1): hand-computed values, the driver's
report, the seed's simplified variant, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradxform as gx
from helpers import needs

D = torch.float64
P0 = {"w": torch.tensor([1.0, -1.0], dtype=D), "b": torch.tensor(0.5, dtype=D)}
S = (torch.tensor([[1.0, 2.0]], dtype=D), torch.tensor([0.0], dtype=D))
S_TILDE = (torch.tensor([[0.0, 1.0]], dtype=D), torch.tensor([1.0], dtype=D))
ONES = {"w": torch.tensor(1.0, dtype=D), "b": torch.tensor(1.0, dtype=D)}


def mse(p, batch):
    x, y = batch
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


@pytest.mark.parametrize("target,p,gamma,value,grad_w,grad_b,norm_branch", [
    ("sgd", 2, 0.0, 2.449489743, 4.898979486, -2.449489743, True),
    ("sgd", 1, 0.0, 4.0, 8.0, -4.0, True),
    ("sgd", None, 3.0, 1.44, 0.96, -0.48, False),
    ("adam", None, 100.0, 1.69, 2.6, -1.3, False),
    ("sgd", None, 2.0, 2.449489743, 4.898979486, -2.449489743, True),
])
def test_objective_hand_values(target, p, gamma, value, grad_w, grad_b, norm_branch):
    """Hand-computed: the objective, its gradient w.r.t. the scales, and the branch."""
    J = gx.gradinit_objective(mse, target=target, lr=0.1, gamma=gamma, p=p)
    v, aux = J(ONES, P0, S, S_TILDE)
    g, _ = torch.func.grad(J, has_aux=True)(ONES, P0, S, S_TILDE)
    assert math.isclose(float(v), value, rel_tol=1e-9)
    assert math.isclose(float(g["w"]), grad_w, rel_tol=1e-9) and math.isclose(float(g["b"]), grad_b, rel_tol=1e-9)
    assert bool(aux["norm_branch"]) is norm_branch


def test_one_scale_step_and_the_lower_bound():
    J = gx.gradinit_objective(mse, target="sgd", lr=0.1, gamma=3.0)
    g, _ = torch.func.grad(J, has_aux=True)(ONES, P0, S, S_TILDE)
    for alpha, w_expected in ((0.01, 0.9), (0.95, 0.95)):
        tx = gx.gradinit_scale_tx(tau=0.1, alpha=alpha, clip=1.0)
        u, _ = tx.update(g, tx.init(ONES), ONES)
        # the first Adam step is tau * sign (up to Adam's eps = 1e-8 relative to |g| ~ 1)
        assert math.isclose(float(ONES["w"] + u["w"]), w_expected, rel_tol=1e-7)
        assert math.isclose(float(ONES["b"] + u["b"]), 1.1, rel_tol=1e-7)


def test_any_chain_as_the_inner_optimizer():
    """gx.sgd(lr) as the target's first step is the SGD look-ahead."""
    J_chain = gx.gradinit_objective(mse, target=gx.sgd(0.1), lr=0.0, gamma=3.0)
    v, _ = J_chain(ONES, P0, S, S_TILDE)
    g, _ = torch.func.grad(J_chain, has_aux=True)(ONES, P0, S, S_TILDE)
    assert math.isclose(float(v), 1.44, rel_tol=1e-9) and math.isclose(float(g["w"]), 0.96, rel_tol=1e-9)


def test_project_lower_bound():
    tx = gx.project_lower_bound(0.5)
    u, _ = tx.update({"a": torch.tensor(-1.0), "b": torch.tensor(0.2)}, tx.init(None),
                     {"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    assert float(u["a"]) == -0.5 and math.isclose(float(u["b"]), 0.2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"a": torch.tensor(1.0)}, tx.init(None))


# --- the driver ---------------------------------------------------------------------------------


def deep_mlp(depth=8, width=32, seed=0, gain=2.0):
    torch.manual_seed(seed)
    layers = []
    d = 16
    for _ in range(depth):
        lin = nn.Linear(d, width)
        nn.init.normal_(lin.weight, std=math.sqrt(gain * 2.0 / d))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 4))
    return nn.Sequential(*layers).double()


def batches(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=g, dtype=D)
    for _ in range(n):
        x = torch.randn(size, 16, generator=g, dtype=D)
        yield x, (x @ w).argmax(1)


def test_driver_report_scales_and_unchanged_module():
    model = deep_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    new, report = gx.gradinit(model, params, batches(40), F.cross_entropy, lr=0.01, gamma=1.0, alpha=0.3, tau=0.05)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert report.iterations == 40 and report.forward_passes == 80 and report.backward_passes == 80
    assert len(report.objective) == len(report.grad_norms) == 40
    assert min(report.scales.values()) >= 0.3 - 1e-12
    assert 0 < report.norm_branch_steps <= 40
    assert report.final_grad_norm == report.grad_norms[-1]
    # the exploding init: the gradient norm starts far above gamma and comes down
    assert report.grad_norms[0] > 10 * report.grad_norms[-1]
    for k, v in new.items():
        torch.testing.assert_close(v, report.scales[k] * params[k])
    assert set(report.act_rms_before) == {f"{i}" for i in range(0, 17, 2)}
    assert report.act_rms_after["16"] < report.act_rms_before["16"]
    assert "norm-branch steps" in str(report) and "0.weight" in str(report)


@pytest.mark.parametrize("gamma", [1e-3, 1e3])  # the norm branch, the look-ahead branch
def test_driver_differentiates_through_a_chain_target(gamma):
    """The driver (torch.autograd with create_graph) through gx.adam's first step, whose in-place
    division autograd refuses unless the transform runs its out-of-place path: one iteration with
    scale_tx = sgd(1) moves the scales by exactly -dJ/dm, equal to torch.func.grad of the
    objective on the same halves of the batch."""
    model = deep_mlp(depth=3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = next(batches(1))
    new, report = gx.gradinit(model, params, [batch], F.cross_entropy, target=gx.adam(0.01), lr=0.01, gamma=gamma,
                              scale_tx=gx.sgd(1.0))
    assert report.norm_branch_steps == (1 if gamma < 1 else 0)

    def loss_fn(p, b):
        return F.cross_entropy(torch.func.functional_call(model, p, (b[0],)), b[1])

    J = gx.gradinit_objective(loss_fn, target=gx.adam(0.01), lr=0.01, gamma=gamma)
    ones = {k: torch.ones((), dtype=D) for k in params}
    half = len(batch[0]) // 2
    g, _ = torch.func.grad(J, has_aux=True)(ones, params, (batch[0][:half], batch[1][:half]),
                                              (batch[0][half:], batch[1][half:]))
    for k in params:
        assert math.isclose(report.scales[k], 1.0 - float(g[k]), rel_tol=1e-9, abs_tol=1e-12), k
    assert max(abs(float(v)) for v in g.values()) > 1e-6


def test_report_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) not installed")
    model = deep_mlp(depth=3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, report = gx.gradinit(model, params, batches(3), F.cross_entropy, lr=0.01)
    fig = report.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000 and len(fig.axes) == 3


def test_simplified_variant_equals_the_gradinit_package():
    """The seed's loss (no look-ahead), same batches, Adam(lr) on the scales, clamp: 10 steps."""
    seed = pytest.importorskip("gradinit", reason="gradinit not installed")
    model = deep_mlp(depth=4, seed=3)
    ref = deep_mlp(depth=4, seed=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = list(batches(10, seed=5))
    wrapper = seed.GradInitWrapper(ref)
    scales = [p for n, p in ref.named_parameters() if n.endswith("_gradinit_scale_factor")]
    opt = torch.optim.Adam(scales, lr=0.05)
    for x, y in data:
        gl = wrapper.grad_loss(F.cross_entropy(ref(x), y), norm=2, gamma=1.0)
        opt.zero_grad()
        gl.backward()
        opt.step()
        wrapper.clamp_scales(0.1)
    seed_scales = {n.replace("_gradinit_scale_factor", ""): float(p.detach()) for n, p in ref.named_parameters()
                   if n.endswith("_gradinit_scale_factor")}
    for p in scales:
        p.grad = None
    wrapper.detach()  # docs/migration/gradinit.md: detach explicitly, never rely on __del__

    tx = gx.chain(gx.scale_by_adam(0.9, 0.999, 1e-8), gx.scale(-0.05), gx.project_lower_bound(0.1))
    _, report = gx.gradinit(model, params, data, F.cross_entropy, lr=0.0, gamma=1.0, p=2, simplified=True, scale_tx=tx)
    assert report.method == "gradinit-simplified" and report.forward_passes == 10
    assert set(seed_scales) == set(report.scales)
    for k, v in seed_scales.items():
        assert math.isclose(report.scales[k], v, rel_tol=1e-5), (k, report.scales[k], v)
    assert any(abs(v - 1.0) > 1e-3 for v in seed_scales.values())


def _kind_models():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.ln = nn.LayerNorm(8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, idx):
            h = self.ln(self.emb(idx))
            return self.head((h + self.att(h, h, h, need_weights=False)[0]).mean(1))

    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    ln = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    return {
        "linear": (nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), lambda g: torch.randn(8, 5, generator=g)),
        "conv2d": (conv, lambda g: torch.randn(8, 1, 6, 6, generator=g)),
        "layernorm": (ln, lambda g: torch.randn(8, 5, generator=g)),
        "embedding_attention": (Attn(), lambda g: torch.randint(0, 11, (8, 4), generator=g)),
    }


@pytest.mark.parametrize("kind", ["linear", "conv2d", "layernorm",
                                  pytest.param("embedding_attention", marks=needs("func_sdpa"))])
def test_gradinit_on_each_kind_of_layer(kind):
    model, make_x = _kind_models()[kind]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = [(make_x(g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)]
    new, report = gx.gradinit(model, params, data, F.cross_entropy, target="adam", lr=1e-3, gamma=0.5, alpha=0.05)
    assert report.iterations == 6 and all(math.isfinite(v) for v in report.objective)
    assert set(report.scales) == set(params) and min(report.scales.values()) >= 0.05 - 1e-7
    assert any(abs(s - 1.0) > 1e-4 for s in report.scales.values())
    for k in params:
        torch.testing.assert_close(new[k], report.scales[k] * params[k])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs("amp_gradscaler_cpu")
def test_autocast_with_grad_scaler():
    model = deep_mlp(depth=3).float()
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [(x.float(), y) for x, y in batches(5)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    new, report = gx.gradinit(model, params, data, F.cross_entropy, lr=0.01, autocast=torch.bfloat16, grad_scaler=scaler)
    assert report.iterations == 5 and report.extra.get("skipped", 0) == 0
    assert float(scaler.get_scale()) == 2.0**12  # grew after 2 and after 4 finite iterations
    assert all(v.dtype == torch.float32 for v in new.values())
    # the bf16 objective tracks the float32 one
    _, ref = gx.gradinit(model, params, data, F.cross_entropy, lr=0.01)
    for k in ref.scales:
        assert abs(report.scales[k] - ref.scales[k]) < 0.02


def test_gradinit_bad_input():
    model = deep_mlp(depth=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match="batch iterable is empty"):
        gx.gradinit(model, params, [], F.cross_entropy, lr=0.1)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        gx.gradinit(model, params, batches(1), lambda o, y: F.cross_entropy(o, y, reduction="none"), lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        gx.gradinit(nn.ReLU(), {}, batches(1), F.cross_entropy, lr=0.1)
    with pytest.raises(ValueError, match="at least 2 examples"):
        gx.gradinit(model, params, [(torch.randn(1, 16, dtype=D), torch.tensor([0]))], F.cross_entropy, lr=0.1)
    with pytest.raises(ValueError, match="target"):
        gx.gradinit_objective(mse, target="lamb", lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        gx.gradinit_objective(mse, lr=-1.0)
