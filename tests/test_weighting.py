"""Loss-weight updaters: GradNorm (Chen et al., ICML 2018, arXiv:1711.02257), uncertainty weighting, DWA, fixed weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gradxform as gx
from helpers import needs

D = torch.float64
G1, G2 = torch.tensor([0.6, 0.8], dtype=D), torch.tensor([3.0, 4.0], dtype=D)


def linear_tasks(c):
    """L_i = a_i . W + c_i at W = 0: per-task gradients a_1 = (0.6, 0.8) (n = 1), a_2 = (3, 4) (n = 5)."""
    def losses_fn(params, batch):
        w = params["W"]
        return torch.stack([G1 @ w + c[0], G2 @ w + c[1]])
    return losses_fn


def test_gradnorm_hand_check_with_sgd_weights():
    """Hand-computed (and gradnorm-pytorch 0.2.3 with its lr doubled): weights and combined gradient at each step, weight_tx = sgd(0.1)."""
    tx = gx.chain(gx.gradnorm(2, alpha=1.5, weight_tx=gx.sgd(0.1), dtype=D), gx.identity())
    params = {"W": torch.zeros(2, dtype=D)}
    state = tx.init(params)
    expected = [((3.6, 4.8), (1.375, 0.625)), ((2.7, 3.6), (1.84375, 0.15625))]
    for c, (combined, weights) in zip(((2.0, 8.0), (1.0, 6.0)), expected):
        f = gx.weighted_grad_and_task_norms(linear_tasks(torch.tensor(c, dtype=D)), shared="W")
        res = f(params, None, gx.loss_weights(state))
        torch.testing.assert_close(res.task_grad_norms, torch.tensor([1.0, 5.0], dtype=D), rtol=1e-12, atol=0)
        torch.testing.assert_close(res.grads["W"], torch.tensor(combined, dtype=D), rtol=1e-12, atol=0)
        _, state = tx.update(res.grads, state, params, losses=res.losses, task_grad_norms=res.task_grad_norms)
        torch.testing.assert_close(gx.loss_weights(state), torch.tensor(weights, dtype=D), rtol=1e-12, atol=0)
    # the diagnostics of the second update: G = (1.375, 3.125)
    torch.testing.assert_close(state[0].task_grad_norms, torch.tensor([1.375, 3.125], dtype=D), rtol=1e-12, atol=0)
    assert int(state[0].count) == 2 and int(state[0].skipped) == 0
    torch.testing.assert_close(state[0].initial_losses, torch.tensor([2.0, 8.0], dtype=D))


def _adam_hand(grads, lr=0.025, b1=0.9, b2=0.999, eps=1e-8):
    m = v = np.zeros(2)
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


def test_gradnorm_default_adam_weight_optimizer_by_hand():
    tx = gx.gradnorm(2, alpha=1.5, dtype=D)  # default weight_tx: Adam(0.025)
    params = {"W": torch.zeros(2, dtype=D)}
    state = tx.init(params)
    w = np.ones(2)
    n = np.array([1.0, 5.0])
    l0 = np.array([2.0, 8.0])
    m = np.zeros(2)
    v = np.zeros(2)
    for t, losses in enumerate(([2.0, 8.0], [1.0, 6.0], [0.5, 5.0]), 1):
        _, state = tx.update({"W": torch.zeros(2, dtype=D)}, state, params,
                             losses=torch.tensor(losses, dtype=D), task_grad_norms=torch.tensor(n, dtype=D))
        # hand: dL/dw, then one Adam step, floor, renormalise to 2
        lhat = np.array(losses) / l0
        r = lhat / lhat.mean()
        g = w * n
        dw = n * np.sign(g - g.mean() * r**1.5)
        m = 0.9 * m + 0.1 * dw
        v = 0.999 * v + 0.001 * dw * dw
        w = w - 0.025 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        w = np.maximum(w, 1e-6)
        w = 2 * w / w.sum()
        np.testing.assert_allclose(state.weights.numpy(), w, rtol=1e-12)
    assert not np.allclose(w, 1.0)


def test_network_gradient_is_the_weighted_loss_gradient_unlike_the_seed():
    """The seed also back-propagates its GradNorm loss into the network (docs/loss-weighting.md, "What gradnorm-pytorch does", item 1)."""
    seed = pytest.importorskip("gradnorm_pytorch", reason="gradnorm-pytorch not installed")
    from gradnorm_pytorch.mocks import MockNetworkWithMultipleLosses

    torch.manual_seed(0)
    net = MockNetworkWithMultipleLosses(dim=8, num_losses=2).double()
    x = torch.randn(4, 8, dtype=D)
    weighter = seed.GradNormLossWeighter(num_losses=2, learning_rate=1e-4, restoring_force_alpha=1.5,
                                         grad_norm_parameters=net.backbone[-1].weight)
    losses = torch.stack(net(x))
    weighter.backward(losses)
    seed_grads = {k: p.grad.clone() for k, p in net.named_parameters()}

    params = {k: p.detach() for k, p in net.named_parameters()}
    f = gx.weighted_grad_and_task_norms(lambda p, b: torch.stack(functional_call(net, p, (b,))),
                                        shared="backbone.2.weight")
    res = f(params, x, torch.ones(2, dtype=D))
    true = torch.func.grad(lambda p: torch.stack(functional_call(net, p, (x,))).sum())(params)
    for k in params:
        torch.testing.assert_close(res.grads[k], true[k], rtol=1e-12, atol=1e-15)
    diff = math.sqrt(sum(float((seed_grads[k] - true[k]).square().sum()) for k in params))
    assert diff > 0.05, f"the seed's network gradient should differ from the weighted-loss gradient; got {diff}"
    # what the seed changes: the shared layer and everything below it
    assert not torch.allclose(seed_grads["backbone.0.weight"], true["backbone.0.weight"])


def test_task_grad_norms_equal_separate_backward_passes_and_activation_variant():
    torch.manual_seed(1)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1).double() for _ in range(3)])
    x = torch.randn(7, 5, dtype=D)
    h = trunk(x)
    losses = torch.stack([hd(h).pow(2).mean() for hd in heads])
    norms = gx.task_grad_norms(losses, trunk[2].weight)
    for i in range(3):
        (g,) = torch.autograd.grad(losses[i], trunk[2].weight, retain_graph=True)
        assert abs(float(norms[i]) - float(g.norm())) < 1e-12
    act_norms = gx.task_grad_norms(losses, h)
    for i in range(3):
        (g,) = torch.autograd.grad(losses[i], h, retain_graph=True)
        assert abs(float(act_norms[i]) - float(g.norm())) < 1e-12

    model = torch.nn.ModuleDict({"trunk": trunk, "heads": heads})
    params = {k: p.detach() for k, p in model.named_parameters()}

    def losses_fn(p, b):
        hh = functional_call(trunk, {k[6:]: v for k, v in p.items() if k.startswith("trunk.")}, (b,))
        out = torch.stack([functional_call(heads[i], {"weight": p[f"heads.{i}.weight"], "bias": p[f"heads.{i}.bias"]},
                                           (hh,)).pow(2).mean() for i in range(3)])
        return out, hh

    res = gx.weighted_grad_and_task_norms(losses_fn, shared=None)(params, x, torch.tensor([1.0, 2.0, 0.5], dtype=D))
    torch.testing.assert_close(res.task_grad_norms, act_norms, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.loss, (torch.tensor([1.0, 2.0, 0.5], dtype=D) * losses.detach()).sum())


def test_adapter_route_equals_functional_route():
    torch.manual_seed(2)
    model = torch.nn.ModuleDict({
        "trunk": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)),
        "a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)}).double()

    def forward(m_or_p, x, y):
        if isinstance(m_or_p, dict):
            h = functional_call(model["trunk"], {k[6:]: v for k, v in m_or_p.items() if k.startswith("trunk.")}, (x,))
            outs = [F.linear(h, m_or_p[f"{t}.weight"], m_or_p[f"{t}.bias"]) for t in "ab"]
        else:
            h = model["trunk"](x)
            outs = [model[t](h) for t in "ab"]
        return torch.stack([F.mse_loss(outs[0], y[:, :1]), 10 * F.mse_loss(outs[1], y[:, 1:])])

    def data(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(16, 4, generator=g, dtype=D), torch.randn(16, 2, generator=g, dtype=D)

    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    tx = gx.chain(gx.gradnorm(2, alpha=1.0, dtype=D), gx.adam(1e-2))
    state = tx.init(params)
    f = gx.weighted_grad_and_task_norms(lambda p, b: forward(p, *b), shared="trunk.2.weight")
    for step in range(6):
        res = f(params, data(step), gx.loss_weights(state))
        updates, state = tx.update(res.grads, state, params, losses=res.losses, task_grad_norms=res.task_grad_norms)
        params = gx.apply_updates(params, updates)

    opt = gx.Optimizer(model.parameters(), gx.chain(gx.gradnorm(2, alpha=1.0, dtype=D), gx.adam(1e-2)))
    for step in range(6):
        opt.zero_grad()
        losses = forward(model, *data(step))
        norms = gx.task_grad_norms(losses, model["trunk"][2].weight)
        (gx.loss_weights(opt) * losses).sum().backward()
        opt.step(losses=losses.detach(), task_grad_norms=norms)
    assert opt.param_groups[0]["lr"] == 1e-2  # not the weight optimizer's 0.025
    torch.testing.assert_close(gx.loss_weights(opt), gx.loss_weights(state), rtol=1e-10, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(gx.loss_weights(state), torch.ones(2, dtype=D))


def _step(tx, state, losses, norms=(1.0, 5.0)):
    p = {"W": torch.zeros(2, dtype=D)}
    _, state = tx.update(p, state, p, losses=torch.tensor(losses, dtype=D), task_grad_norms=torch.tensor(norms, dtype=D))
    return state


def test_gradnorm_schedules_frozen_mask_and_initial_losses():
    p = {"W": torch.zeros(2, dtype=D)}
    # update_after=1, update_every=2: the weights move on updates 1 and 3 only (0-based)
    tx = gx.gradnorm(2, weight_tx=gx.sgd(0.1), update_after=1, update_every=2, dtype=D)
    s = tx.init(p)
    history = []
    for losses in ([2.0, 8.0], [2.0, 8.0], [2.0, 8.0], [2.0, 8.0]):
        s = _step(tx, s, losses)
        history.append(s.weights.clone())
    assert torch.equal(history[0], torch.ones(2, dtype=D))
    assert not torch.equal(history[1], history[0]) and torch.equal(history[2], history[1])
    assert not torch.equal(history[3], history[2])

    frozen = gx.gradnorm(2, weight_tx=gx.sgd(0.1), frozen=True, dtype=D)
    s = _step(frozen, frozen.init(p), [2.0, 8.0])
    assert torch.equal(s.weights, torch.ones(2, dtype=D)) and torch.equal(s.initial_losses, torch.tensor([2.0, 8.0], dtype=D))

    # a known L0 = (1, 8): at step 0 r = (2/1, 8/8) / mean = (4/3, 2/3)
    known = gx.gradnorm(2, alpha=1.0, weight_tx=gx.sgd(0.1), initial_losses=[1.0, 8.0], dtype=D)
    s = _step(known, known.init(p), [2.0, 8.0])
    g = np.array([1.0, 5.0])
    target = g.mean() * np.array([4 / 3, 2 / 3])
    w = 1 - 0.1 * np.array([1.0, 5.0]) * np.sign(g - target)
    np.testing.assert_allclose(s.weights.numpy(), 2 * w / w.sum(), rtol=1e-12)

    # mask: task 2 of 3 keeps its weight; the other two keep their sum (2)
    masked = gx.gradnorm(3, weight_tx=gx.sgd(0.1), mask=[True, False, True], dtype=D)
    s = _step(masked, masked.init({"W": torch.zeros(2, dtype=D)}), [2.0, 1.0, 8.0], norms=(1.0, 3.0, 5.0))
    assert float(s.weights[1]) == 1.0
    np.testing.assert_allclose(float(s.weights[0] + s.weights[2]), 2.0, rtol=1e-12)
    # by hand over the balanced tasks only: G = (1, 5), Gbar = 3, r = 1 -> dw = (-1, 5)
    w = np.array([1.1, 0.5])
    np.testing.assert_allclose(s.weights[[0, 2]].numpy(), 2 * w / w.sum(), rtol=1e-12)

    # EMA of the initial losses
    ema = gx.gradnorm(2, weight_tx=gx.sgd(0.1), initial_losses_decay=0.5, dtype=D)
    s = _step(ema, ema.init(p), [2.0, 8.0])
    s = _step(ema, s, [1.0, 6.0])
    torch.testing.assert_close(s.initial_losses, torch.tensor([1.5, 7.0], dtype=D))


def test_gradnorm_bad_input():
    tx = gx.gradnorm(2, weight_tx=gx.sgd(0.1), dtype=D)
    p = {"W": torch.zeros(2, dtype=D)}
    s = tx.init(p)
    with pytest.raises(ValueError, match=r"'losses' must have shape \(2,\).*got shape \(3,\)"):
        tx.update(p, s, p, losses=torch.ones(3, dtype=D), task_grad_norms=torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*reduce each task's loss"):
        tx.update(p, s, p, losses=torch.ones(2, 4, dtype=D), task_grad_norms=torch.ones(2, dtype=D))
    with pytest.raises(TypeError, match="task_grad_norms"):
        gx.chain(tx, gx.identity()).update(p, (s, gx.EmptyState()), p, losses=torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="num_tasks"):
        gx.gradnorm(0)
    with pytest.raises(ValueError, match="alpha"):
        gx.gradnorm(2, alpha=-1.0)
    with pytest.raises(ValueError, match="mask excludes every task"):
        gx.gradnorm(2, mask=[False, False])
    with pytest.raises(ValueError, match="initial_losses"):
        gx.gradnorm(2, initial_losses=[1.0, 0.0])
    # a NaN loss: documented skip, weights and L0 unchanged, counted
    s = _step(tx, s, [2.0, 8.0])
    before = s.weights.clone()
    s2 = _step(tx, s, [float("nan"), 6.0])
    assert torch.equal(s2.weights, before) and torch.equal(s2.initial_losses, s.initial_losses)
    assert int(s2.skipped) == 1 and int(s2.count) == 2
    s3 = _step(tx, s2, [1.0, 6.0], norms=(float("inf"), 5.0))
    assert torch.equal(s3.weights, before) and int(s3.skipped) == 2
    # a NaN on the very first update does not become L0
    s = _step(tx, tx.init(p), [float("nan"), 8.0])
    assert torch.equal(s.initial_losses, torch.zeros(2, dtype=D)) and torch.isfinite(s.weights).all()
    s = _step(tx, s, [2.0, 8.0])
    torch.testing.assert_close(s.initial_losses, torch.tensor([2.0, 8.0], dtype=D))


@needs("fullgraph_compile")
def test_gradnorm_compiles_and_equals_eager():
    tx = gx.gradnorm(2, alpha=1.5, dtype=D)
    p = {"W": torch.zeros(2, dtype=D)}

    def step(state, losses, norms):
        return tx.update(p, state, p, losses=losses, task_grad_norms=norms)[1]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    se, sc = tx.init(p), tx.init(p)
    for losses in ([2.0, 8.0], [1.0, 6.0], [float("nan"), 1.0], [0.5, 5.0]):
        args = (torch.tensor(losses, dtype=D), torch.tensor([1.0, 5.0], dtype=D))
        se, sc = step(se, *args), compiled(sc, *args)
        torch.testing.assert_close(sc.weights, se.weights, rtol=1e-12, atol=0)
    assert int(sc.skipped) == 1


def test_gradnorm_under_multi_steps_moves_weights_once_per_accumulated_step():
    p = {"W": torch.zeros(2, dtype=D)}
    tx = gx.multi_steps(gx.chain(gx.gradnorm(2, weight_tx=gx.sgd(0.1), dtype=D), gx.sgd(0.1)), every_k=3)
    s = tx.init(p)
    seen = []
    for losses in ([2.0, 8.0],) * 6:
        _, s = tx.update(p, s, p, losses=torch.tensor(losses, dtype=D), task_grad_norms=torch.tensor([1.0, 5.0], dtype=D))
        seen.append(gx.loss_weights(s).clone())
    assert torch.equal(seen[0], torch.ones(2, dtype=D)) and torch.equal(seen[1], seen[0])
    torch.testing.assert_close(seen[2], torch.tensor([1.375, 0.625], dtype=D))
    assert torch.equal(seen[3], seen[2]) and not torch.equal(seen[5], seen[2])
    assert int(s.inner_state[0].count) == 2


# --- uncertainty weighting, DWA, fixed weights -----------------------------------------------------


def test_uncertainty_weighting_by_hand():
    tx = gx.uncertainty_weighting(2, weight_tx=gx.sgd(0.1), dtype=D)
    p = {"W": torch.zeros(1, dtype=D)}
    s = tx.init(p)
    log_vars = np.zeros(2)
    for losses in ([2.0, 0.5], [1.5, 0.25], [1.0, 0.1]):
        _, s = tx.update(p, s, p, losses=torch.tensor(losses, dtype=D))
        log_vars = log_vars - 0.1 * (1.0 - np.exp(-log_vars) * np.array(losses))
        np.testing.assert_allclose(s.log_vars.numpy(), log_vars, rtol=1e-12)
        np.testing.assert_allclose(gx.loss_weights(s).numpy(), np.exp(-log_vars), rtol=1e-12)
    # the first step by hand: s = -0.1 * (1 - L) = (0.1, -0.05)
    # the weights move towards 1 / L: the task with the larger loss gets the smaller weight
    assert float(s.weights[0]) < float(s.weights[1])
    _, s2 = tx.update(p, s, p, losses=torch.tensor([float("nan"), 1.0], dtype=D))
    assert torch.equal(s2.log_vars, s.log_vars) and int(s2.skipped) == 1


def test_uncertainty_first_step_value():
    tx = gx.uncertainty_weighting(2, weight_tx=gx.sgd(0.1), dtype=D)
    p = {"W": torch.zeros(1, dtype=D)}
    _, s = tx.update(p, tx.init(p), p, losses=torch.tensor([2.0, 0.5], dtype=D))
    torch.testing.assert_close(s.log_vars, torch.tensor([0.1, -0.05], dtype=D))


def test_dwa_by_hand():
    tx = gx.dwa(2, temperature=2.0, period=2, dtype=D)
    p = {"W": torch.zeros(1, dtype=D)}
    s = tx.init(p)
    seq = [[4.0, 2.0], [2.0, 2.0], [2.0, 1.0], [2.0, 1.0], [1.0, 1.0], [1.0, 0.5]]
    got = []
    for losses in seq:
        _, s = tx.update(p, s, p, losses=torch.tensor(losses, dtype=D))
        got.append(s.weights.numpy().copy())
    # periods: means (3, 2), (2, 1), (1, 0.75); weights change at the end of period 2 and 3
    np.testing.assert_allclose(got[0], [1, 1]) and np.testing.assert_allclose(got[2], [1, 1])

    def w(r):
        e = np.exp(np.array(r) / 2.0)
        return 2 * e / e.sum()

    np.testing.assert_allclose(got[3], w([2 / 3, 1 / 2]), rtol=1e-12)
    np.testing.assert_allclose(got[4], got[3])
    np.testing.assert_allclose(got[5], w([1 / 2, 0.75]), rtol=1e-12)
    assert int(s.periods) == 3


def test_fixed_weights_and_loss_weights_reader():
    tx = gx.chain(gx.fixed_weights([1.0, 2.0]), gx.sgd(0.1))
    p = {"W": torch.ones(2)}
    s = tx.init(p)
    u, s = tx.update({"W": torch.ones(2)}, s, p, losses=torch.ones(2), task_grad_norms=torch.ones(2))
    torch.testing.assert_close(u["W"], torch.full((2,), -0.1))
    torch.testing.assert_close(gx.loss_weights(s), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="no loss-weight state"):
        gx.loss_weights(gx.sgd(0.1).init(p))
    both = gx.chain(gx.fixed_weights([1.0]), gx.fixed_weights([2.0]))
    with pytest.raises(ValueError, match="2 loss-weight states"):
        gx.loss_weights(both.init(p))
    with pytest.raises(ValueError, match="weights"):
        gx.fixed_weights([1.0, float("nan")])


def test_seed_inverts_the_restoring_force_and_we_follow_the_paper():
    """gradnorm-pytorch 0.2.3 targets Gbar * r^-alpha; the paper (eq. 2) targets Gbar * r^alpha.

    Task 1's loss falls fast (L/L0 = 0.2 vs 1.0), so the paper lowers its weight; the seed raises it.
    With lr 0.2 in the seed (its l1 loss is a mean over tasks) and sgd(0.1) here, the first step
    agrees (r = 1) and the second differs.
    """
    seed = pytest.importorskip("gradnorm_pytorch", reason="gradnorm-pytorch not installed")
    a = [torch.tensor([0.6, 0.8], dtype=D), torch.tensor([1.2, 1.6], dtype=D)]  # n = (1, 2)
    W = torch.nn.Parameter(torch.zeros(2, dtype=D))
    weighter = seed.GradNormLossWeighter(num_losses=2, learning_rate=0.2, restoring_force_alpha=1.5,
                                         grad_norm_parameters=W).double()
    tx = gx.gradnorm(2, alpha=1.5, weight_tx=gx.sgd(0.1), dtype=D)
    s = tx.init({"W": W.detach()})
    hand = [(1.1578947368421053, 0.8421052631578947), (1.0075187969924813, 0.9924812030075188)]
    seed_second = (1.3240997229916898, 0.6759002770083102)
    for c, expected in zip(([1.0, 1.0], [0.2, 1.0]), hand):
        weighter.backward(torch.stack([a[0] @ W + c[0], a[1] @ W + c[1]]))
        W.grad = None
        s = _step(tx, s, c, norms=(1.0, 2.0))
        np.testing.assert_allclose(s.weights.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(weighter.loss_weights.detach().numpy(), seed_second, rtol=1e-12)


# --- no host sync; where the counters live ------------------------------------------------------------

META_UPDATERS = {
    "gradnorm": lambda: gx.gradnorm(3, update_every=2, initial_losses_decay=0.9),
    "gradnorm_masked_sgd": lambda: gx.gradnorm(3, weight_tx=gx.sgd(0.1, momentum=0.9), mask=[True, True, False]),
    "uncertainty_weighting": lambda: gx.uncertainty_weighting(3),
    "dwa": lambda: gx.dwa(3, period=2),
    "fixed_weights": lambda: gx.fixed_weights([1.0, 2.0, 3.0]),
}


@needs("meta_foreach")
@pytest.mark.parametrize("name", sorted(META_UPDATERS))
def test_update_reads_no_device_value_and_keeps_counts_on_cpu(name):
    """The meta device stands in for an accelerator: its tensors have no data, so any host read of
    a device value (``.item()``, ``.cpu()``, ``bool()``) raises. ``count`` (and DWA's ``periods``)
    advance on every update and stay 0-d int64 CPU tensors; the weights, statistics and the counts
    of data-dependent events (``skipped``, DWA's ``seen``) stay on the params' device."""
    tx = META_UPDATERS[name]()
    params = {"w": torch.empty(4, 3, device="meta")}
    state = tx.init(params)
    for _ in range(4):
        _, state = tx.update({"w": torch.empty(4, 3, device="meta")}, state, params,
                             losses=torch.empty(3, device="meta"), task_grad_norms=torch.empty(3, device="meta"))
    assert state.weights.device.type == "meta"
    every_update = {"count", "periods"}
    for field in state._fields:
        x = getattr(state, field)
        if isinstance(x, torch.Tensor):
            expected = "cpu" if field in every_update else "meta"
            assert x.device.type == expected, (field, x.device)
    if "count" in state._fields:
        assert int(state.count) == 4
