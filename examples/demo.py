"""gradxform's showcase: all four families in one multitask training run on scikit-learn's digits.

A deep, unnormalised MLP trunk (10 Linear + ReLU layers, initialised at twice the He standard
deviation, which makes its activations grow 2x per layer) feeds two heads: the digit's class
(cross-entropy) and the digit's value as a number (mean squared error, a loss several times larger at the
start). Then:

1. **init-scale solver**: ``gx.gradinit`` learns one scale per parameter tensor so that the first
   step of ``gx.adam(LR)`` lowers the (equal-weight) multitask loss while ``||g||_2 <= 50``, on the
   unmodified module;
2. one chain for training::

       tx = gx.chain(gx.gradnorm(2),                          # loss weighting: balance the tasks
                     gx.autoclip(0.5, history=100),           # clipper: the median of the last 100 norms
                     gx.tg_adamw(LR, weight_decay=1e-4))      # second moments: TrueGrad AdamW

   whose ``update`` takes the per-task ``losses``, their gradient norms at the shared trunk output
   (``task_grad_norms``) and the sum of squared per-example gradients (``sum_grad_squared``);
3. the same ``tx`` twice, from the same GradInit params and batches: (a) a functional loop
   (``gx.grad_and_sum_grad_squared`` on ``torch.func.functional_call``) and (b) ``gx.Optimizer``
   with ``loss.backward()`` under ``gx.track_sum_grad_squared``; each saves one checkpoint halfway
   (params + the chain's state) and resumes from it;
4. a baseline: the same chain from the same bad init without GradInit.

It prints a table of what each transform did (GradInit's scales, GradNorm's weights, AutoClip's
clip fraction, accuracy and error per task) and checks that (a) and (b) end with the same params.

Run:  python examples/demo.py [--epochs 12] [--seed 0] [--plot demo.png]   (needs scikit-learn;
      --plot needs matplotlib)
"""

from __future__ import annotations

import argparse
import io
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gradxform as gx
from digits_data import load_data

DEPTH, WIDTH = 10, 64
LR = 2e-3
GAMMA = 50.0  # GradInit's bound on ||g||_2 at the start of training
BATCH = 64
DT = torch.float64  # (a) and (b) agree to rounding; float64 keeps that rounding far below 1e-6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(DEPTH):
            layers += [nn.Linear(64 if i == 0 else WIDTH, WIDTH), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.cls = nn.Linear(WIDTH, 10)
        self.val = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls(h), self.val(h).squeeze(-1), h


def bad_init(seed: int) -> Net:
    """Twice the He standard deviation, zero biases: the trunk's output is ~2^10 times too large."""
    torch.manual_seed(seed)
    net = Net().to(DT)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 2.0 * (2.0 / m.in_features) ** 0.5)
                m.bias.zero_()
    return net


def task_losses(logits: torch.Tensor, value: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(2,)``: cross-entropy of the class, MSE of the digit's value."""
    return torch.stack([F.cross_entropy(logits, y), F.mse_loss(value, y.to(value.dtype))])


def head_norms(net: Net, params: dict[str, torch.Tensor] | None, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GradNorm's ``task_grad_norms``: ``||d L_i / d h||`` at the trunk output ``h`` (the shared
    activation), through the heads only."""
    hd = h.detach().requires_grad_(True)
    with torch.enable_grad():
        if params is None:
            logits, value = net.cls(hd), net.val(hd).squeeze(-1)
        else:
            sub = lambda pre: {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}  # noqa: E731
            logits = functional_call(net.cls, sub("cls."), (hd,))
            value = functional_call(net.val, sub("val."), (hd,)).squeeze(-1)
        return gx.task_grad_norms(task_losses(logits, value, y), hd)


def make_tx(steps: int) -> gx.GradientTransformation:
    return gx.chain(gx.gradnorm(2, alpha=1.5), gx.autoclip(0.5, history=100),
                    gx.tg_adamw(gx.cosine_decay_schedule(LR, steps, alpha=0.05), weight_decay=1e-4))


def epoch_batches(n: int, epoch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(BATCH))


def evaluate(net: Net, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits, value, _ = functional_call(net, params, (x,))
    acc = (logits.argmax(1) == y).double().mean().item()
    mae = (value - y.to(value.dtype)).abs().mean().item()
    return acc, mae


def clip_stats(state) -> tuple[int, int]:
    """AutoClip's counters (``count``, ``clipped``) from the chain's state."""
    stats = state[1].stats
    return int(stats.count), int(stats.clipped)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train_functional(net: Net, params: dict[str, torch.Tensor], data, epochs: int, seed: int, log=None):
    """(a): the functional loop. ``log(epoch, state, params, losses)`` once per epoch."""
    x_tr, y_tr = data
    steps = epochs * len(epoch_batches(len(x_tr), 0, seed))
    tx = make_tx(steps)
    state = tx.init(params)

    def weighted_loss(p, batch, weights):
        logits, value, h = functional_call(net, p, (batch[0],))
        losses = task_losses(logits, value, batch[1])
        return (weights * losses).sum(), (losses.detach(), h.detach())

    engine = gx.grad_and_sum_grad_squared(weighted_loss, has_aux=True)
    resumed = None
    for epoch in range(1, epochs + 1):
        if epoch == epochs // 2 + 1:  # one checkpoint halfway: params + the chain's state, and back
            saved = roundtrip({"params": params, "tx": gx.state_to_dict(state)})
            params, state = saved["params"], gx.state_from_dict(tx.init(params), saved["tx"])
            resumed = epoch - 1
        total = torch.zeros(2, dtype=DT)
        for idx in epoch_batches(len(x_tr), epoch, seed):
            x, y = x_tr[idx], y_tr[idx]
            res = engine(params, (x, y), gx.loss_weights(state))
            losses, h = res.aux
            norms = head_norms(net, params, h, y)
            updates, state = tx.update(res.grads, state, params, losses=losses, task_grad_norms=norms,
                                       sum_grad_squared=res.sum_grad_squared)
            params = gx.apply_updates(params, updates)
            total += losses * len(idx)
        if log is not None:
            log(epoch, state, params, total / len(x_tr))
    return params, state, resumed


def train_optimizer(net: Net, data, epochs: int, seed: int):
    """(b): the same chain as a torch.optim.Optimizer, with a checkpoint of model + optimizer."""
    x_tr, y_tr = data
    steps = epochs * len(epoch_batches(len(x_tr), 0, seed))
    opt = gx.Optimizer(net.parameters(), make_tx(steps))
    for epoch in range(1, epochs + 1):
        if epoch == epochs // 2 + 1:
            saved = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
            net.load_state_dict(saved["model"])
            fresh = gx.Optimizer(net.parameters(), make_tx(steps))
            fresh.load_state_dict(saved["opt"])
            opt = fresh
        for idx in epoch_batches(len(x_tr), epoch, seed):
            x, y = x_tr[idx], y_tr[idx]
            with gx.track_sum_grad_squared(net.parameters()) as stats:
                logits, value, h = net(x)
                losses = task_losses(logits, value, y)
                (gx.loss_weights(opt) * losses).sum().backward()
            opt.step(losses=losses.detach(), task_grad_norms=head_norms(net, None, h, y),
                     sum_grad_squared=stats.sum_grad_squared)
            opt.zero_grad()
    return {k: v.detach() for k, v in net.named_parameters()}, opt


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradinit-iters", type=int, default=150)
    ap.add_argument("--plot", default=None, help="save a figure to this path (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (a checkpoint is taken halfway)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = (t.to(DT) if t.is_floating_point() else t for t in load_data(args.seed))
    net = bad_init(args.seed)
    params0 = {k: v.detach().clone() for k, v in net.named_parameters()}

    print(f"gradxform {gx.__version__} showcase: digits ({len(x_tr)} train / {len(x_te)} test), two tasks "
          f"(class: cross-entropy, value: MSE), MLP trunk {DEPTH} x Linear({WIDTH}) + ReLU at 2x He std, "
          f"{args.epochs} epochs, seed {args.seed}")

    # 1. GradInit: scales for every tensor, so that Adam's first step (lr LR) helps both tasks
    g = torch.Generator().manual_seed(args.seed)
    draws = (torch.randint(0, len(x_tr), (2 * BATCH,), generator=g) for _ in range(args.gradinit_iters))
    batches = ((x_tr[i], y_tr[i]) for i in draws)
    params, report = gx.gradinit(net, params0, batches, lambda out, y: task_losses(out[0], out[1], y).sum(),
                                 target=gx.adam(LR), lr=LR, gamma=GAMMA)
    w_scales = sorted(v for k, v in report.scales.items() if k.endswith("weight"))
    print(f"\n[GradInit]  {report.iterations} iterations, {report.norm_branch_steps} took the gradient-norm "
          f"branch; weight scales min / median / max = {w_scales[0]:.3f} / {w_scales[len(w_scales) // 2]:.3f} / "
          f"{w_scales[-1]:.3f}; last trunk layer's output RMS "
          f"{report.act_rms_before['trunk.18']:.3g} -> {report.act_rms_after['trunk.18']:.3g}")

    # 2-3. training, (a) functional, printing the table
    rows: list[dict] = []

    def log(epoch, state, p, losses):
        count, clipped = clip_stats(state)
        acc, mae = evaluate(net, p, x_te, y_te)
        w = gx.loss_weights(state)
        prev = rows[-1]["clipped"] if rows else (0, 0)
        rows.append({"epoch": epoch, "losses": losses.tolist(), "w": w.tolist(), "acc": acc, "mae": mae,
                     "clipped": (count, clipped), "epoch_clip": (clipped - prev[1]) / max(count - prev[0], 1)})
        r = rows[-1]
        print(f"{epoch:>5}  {r['losses'][0]:>8.4f} {r['losses'][1]:>8.4f}  {r['w'][0]:>6.3f} {r['w'][1]:>6.3f}  "
              f"{r['epoch_clip']:>8.1%}  {acc:>7.1%}  {mae:>7.3f}")

    print("\n[training (a): functional loop, chain(gradnorm(2), autoclip(0.5), tg_adamw)]")
    print(f"{'epoch':>5}  {'L_class':>8} {'L_value':>8}  {'w_class':>6} {'w_value':>6}  {'clipped':>8}  "
          f"{'test acc':>7}  {'val MAE':>7}")
    p_a, state_a, resumed = train_functional(net, params, (x_tr, y_tr), args.epochs, args.seed, log)
    print(f"      (checkpoint after epoch {resumed}: params + gx.state_to_dict(state), saved, loaded, resumed)")

    # (b) the same chain through gx.Optimizer on a module holding the GradInit params
    net_b = bad_init(args.seed)
    net_b.load_state_dict(params)  # the module is changed only here, by us
    p_b, opt = train_optimizer(net_b, (x_tr, y_tr), args.epochs, args.seed)
    diff = max((p_a[k] - p_b[k]).abs().max().item() for k in p_a)

    # 4. baseline: the same chain from the same bad init, without GradInit
    p_base, _, _ = train_functional(net, params0, (x_tr, y_tr), args.epochs, args.seed)
    acc_base, mae_base = evaluate(net, p_base, x_te, y_te)
    acc_a, mae_a = rows[-1]["acc"], rows[-1]["mae"]
    count, clipped = rows[-1]["clipped"]

    print("\n[what each transform did]")
    print(f"  gradinit     weight scales {w_scales[0]:.3f}-{w_scales[-1]:.3f}, {report.norm_branch_steps} norm-branch "
          f"steps of {report.iterations}, final ||g||_2 = {report.final_grad_norm:.3g}")
    print(f"  gradnorm     task weights (class, value): 1.000, 1.000 -> {rows[-1]['w'][0]:.3f}, {rows[-1]['w'][1]:.3f}")
    print(f"  autoclip     clipped {clipped} of {count} steps ({clipped / count:.1%}) at the median of the last 100 norms")
    print(f"  tg_adamw     second moment from sum_grad_squared ({'; '.join(sorted(set(m.split(':')[0] for m in opt_methods(opt, net_b))))})")
    print("\n[result]                    class test accuracy   value test MAE")
    print(f"  with GradInit (a)         {acc_a:>19.1%}   {mae_a:>14.3f}")
    print(f"  without GradInit          {acc_base:>19.1%}   {mae_base:>14.3f}")
    verdict = "same params" if diff < 1e-6 else "DIVERGED"
    print(f"  (a) functional vs (b) gx.Optimizer: max |param difference| = {diff:.2e} ({verdict}, tolerance 1e-6)")
    print(f"done in {time.perf_counter() - t0:.1f} s")

    if args.plot:
        plot(rows, report, args.plot)
    return {"rows": rows, "diff": diff, "acc": acc_a, "mae": mae_a, "acc_base": acc_base, "mae_base": mae_base,
            "report": report, "clip_fraction": clipped / count}


def opt_methods(opt: gx.Optimizer, net: Net) -> list[str]:
    """How the statistic was computed for each param in the last step (the tracker's report)."""
    with gx.track_sum_grad_squared(net.parameters()) as stats:
        logits, value, _ = net(torch.zeros(2, 64, dtype=DT))
        task_losses(logits, value, torch.zeros(2, dtype=torch.long)).sum().backward()
    net.zero_grad()
    return list(stats.methods.values())


def plot(rows: list[dict], report, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no figure written to {path})")
        return
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.4))
    names = [k for k in report.scales if k.endswith("weight")]
    ax[0].bar(range(len(names)), [report.scales[k] for k in names])
    ax[0].set_title("GradInit scale per weight tensor")
    ax[0].set_xlabel("layer")
    ax[1].semilogy(ep, [r["losses"][0] for r in rows], label="class (CE)")
    ax[1].semilogy(ep, [r["losses"][1] for r in rows], label="value (MSE)")
    ax[1].set_title("training losses")
    ax[1].legend()
    ax[2].plot(ep, [r["w"][0] for r in rows], label="w_class")
    ax[2].plot(ep, [r["w"][1] for r in rows], label="w_value")
    ax[2].set_title("GradNorm weights")
    ax[2].legend()
    ax[3].plot(ep, [100 * r["epoch_clip"] for r in rows])
    ax[3].set_title("AutoClip: % of steps clipped")
    for a in ax[1:]:
        a.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure written to {path}")


if __name__ == "__main__":
    raise SystemExit(0 if main()["diff"] < 1e-6 else 1)  # (a) and (b) must agree
