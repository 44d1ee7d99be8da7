"""Learn the learning rate by differentiating through unrolled optimizer steps (a hypergradient).

    log_lr = torch.tensor(log(1e-4))                      # the hyperparameter, a plain tensor
    def unrolled(log_lr, params, state, batches, val):    # k inner steps, then the validation loss
        state = gx.set_hyperparam(copy(state), "lr", log_lr.exp())
        for x, y in batches:                              # k = 10 training minibatches
            grads = torch.func.grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            params = gx.apply_updates(params, updates)
        return loss_fn(params, *val)
    hypergrad = torch.func.grad(unrolled)(log_lr, ...)    # d val_loss / d log_lr, through all k steps
    log_lr <- outer Adam step on hypergrad                # gx.adam on {"log_lr": log_lr}

The inner optimizer is ``gx.sgd(lr, momentum=0.9)`` (``--inner adam`` for ``gx.adam(lr)``) on a
64-32-10 MLP for scikit-learn's digits; the training split is cut into a training part (the inner
minibatches, 64 rows) and a validation part (the hypergradient's loss, all of it). The training is
online (truncated unrolling): each outer step unrolls k inner steps from the *current* params and
optimizer state, takes the hypergradient, and keeps the unrolled params and state (detached) as
the start of the next outer step; the lr that made them is the lr before the outer update. The
lr is learned in log space, so the outer Adam moves it by about a constant factor per step.

Starting from lr = 1e-4 (far too small: the model hardly moves), the hypergradient drives the lr
up by orders of magnitude within a few dozen outer steps. For reference the script also trains
the same model for the same number of inner steps with the lr fixed at its start value and at
the final learned value.

Printed: the lr trajectory (every few outer steps: lr, validation loss after the unroll, the
hypergradient), then the final lr and the validation / test results. ``--smoke``: a short run
for CI. ``train()`` is importable.

Run:  python examples/learned_lr.py [--inner sgd|adam] [--outer-steps 60] [--unroll 10] [--seed 0] [--smoke]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import gradxform as gx
from digits_data import load_data

BATCH_SIZE = 64
N_VAL = 300


def make_inner(name: str, lr: float) -> gx.GradientTransformation:
    if name == "sgd":
        return gx.sgd(lr, momentum=0.9)
    if name == "adam":
        # exact zeros in the gradient (blank border pixels, dead units) leave Adam's v at 0; inside
        # torch.func the root has a zero derivative there, so the hypergradient stays finite
        return gx.adam(lr)
    raise ValueError(f"unknown inner optimizer {name!r}")


def train(inner: str = "sgd", outer_steps: int = 60, unroll: int = 10, lr0: float = 1e-4, outer_lr: float = 0.2,
          seed: int = 0, verbose: bool = False, print_every: int = 5) -> dict:
    """Learn the inner lr; return ``dict(lrs=[lr used at each outer step, then the final one],
    val_losses=[validation loss after each unroll], final_lr=, learned=, fixed_start=, fixed_final=)``;
    the last three are ``dict(val_loss=, test_acc=)`` of the online run and of fixed-lr runs of the
    same length at ``lr0`` and at ``final_lr``."""
    X_all, y_all, X_te, y_te = load_data(seed)
    perm = torch.randperm(len(X_all), generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:N_VAL], perm[N_VAL:]
    X_val, y_val, X_tr, y_tr = X_all[val_idx], y_all[val_idx], X_all[tr_idx], y_all[tr_idx]

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def test_acc(p: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return (functional_call(model, p, (X_te,)).argmax(1) == y_te).float().mean().item()

    # One fixed stream of training minibatches, shared by the online run and the fixed-lr runs.
    gen = torch.Generator().manual_seed(seed + 1)
    n_inner = outer_steps * unroll
    usable = (len(X_tr) // BATCH_SIZE) * BATCH_SIZE
    stream = torch.cat([torch.randperm(len(X_tr), generator=gen)[:usable]
                        for _ in range(math.ceil(n_inner * BATCH_SIZE / usable))])
    batches = stream[: n_inner * BATCH_SIZE].view(n_inner, BATCH_SIZE)

    tx = make_inner(inner, lr0)

    def unrolled(log_lr: torch.Tensor, params: dict, state, chunk: torch.Tensor):
        # A new state container: set_hyperparam writes its dict in place, and the caller's state
        # must not keep the traced lr.
        state = gx.tree.tree_map(lambda t: t, state)
        state = gx.set_hyperparam(state, "lr", log_lr.exp())
        for idx in chunk:
            grads = grad(loss_fn)(params, X_tr[idx], y_tr[idx])
            updates, state = tx.update(grads, state, params)
            params = gx.apply_updates(params, updates)
        val = loss_fn(params, X_val, y_val)
        # torch.func.grad's aux must hold only tensors; Adam's state has None leaves (no AMSGrad
        # buffer), so hand the state back as its tensor leaves and rebuild it outside.
        leaves, box["spec"] = gx.tree.tree_flatten(state)
        box["none"] = [i for i, x in enumerate(leaves) if x is None]
        return val, (val, params, [x for x in leaves if x is not None])

    def rebuild(tensors: list) -> object:
        it = iter(tensors)
        leaves = [None if i in box["none"] else next(it) for i in range(len(tensors) + len(box["none"]))]
        return gx.tree.tree_unflatten(box["spec"], leaves)

    box: dict = {}
    hypergrad_fn = grad(unrolled, has_aux=True)

    log_lr = {"log_lr": torch.tensor(math.log(lr0), dtype=torch.float64)}
    outer_tx = gx.adam(outer_lr)
    outer_state = outer_tx.init(log_lr)
    params, state = params0, tx.init(params0)
    lrs, val_losses = [], []
    if verbose:
        print(f"inner {inner}: {'gx.sgd(lr, momentum=0.9)' if inner == 'sgd' else 'gx.adam(lr)'}, unroll {unroll} "
              f"steps of batch {BATCH_SIZE}; outer gx.adam({outer_lr}) on log(lr); start lr {lr0:.1e}")
        print(f"{'outer':>5}  {'inner steps':>11}  {'lr':>9}  {'val loss':>8}  {'d val/d log lr':>14}")
    for k in range(outer_steps):
        chunk = batches[k * unroll:(k + 1) * unroll]
        hg, (val, params, state_tensors) = hypergrad_fn(log_lr["log_lr"], params, state, chunk)
        state = rebuild(state_tensors)
        lrs.append(math.exp(log_lr["log_lr"].item()))
        val_losses.append(val.item())
        if verbose and (k % print_every == 0 or k == outer_steps - 1):
            print(f"{k + 1:5d}  {(k + 1) * unroll:11d}  {lrs[-1]:9.2e}  {val_losses[-1]:8.4f}  {hg.item():14.3e}")
        upd, outer_state = outer_tx.update({"log_lr": hg}, outer_state, log_lr)
        log_lr = gx.apply_updates(log_lr, upd)
    final_lr = math.exp(log_lr["log_lr"].item())
    lrs.append(final_lr)
    learned = dict(val_loss=val_losses[-1], test_acc=test_acc(params))

    def fixed(lr: float) -> dict:
        tx_f = make_inner(inner, lr)
        p, s = params0, tx_f.init(params0)
        for idx in batches:
            u, s = tx_f.update(grad(loss_fn)(p, X_tr[idx], y_tr[idx]), s, p)
            p = gx.apply_updates(p, u)
        with torch.no_grad():
            return dict(val_loss=loss_fn(p, X_val, y_val).item(), test_acc=test_acc(p))

    fixed_start, fixed_final = fixed(lr0), fixed(final_lr)
    if verbose:
        print(f"lr: {lr0:.2e} -> {final_lr:.2e} ({final_lr / lr0:.0f}x) after {outer_steps} outer steps")
        print(f"after {n_inner} inner steps:")
        print(f"  {'online, learned lr':<24}  val loss {learned['val_loss']:.4f}  test acc {learned['test_acc']:.1%}")
        print(f"  {f'fixed lr {lr0:.2e}':<24}  val loss {fixed_start['val_loss']:.4f}  test acc {fixed_start['test_acc']:.1%}")
        print(f"  {f'fixed lr {final_lr:.2e}':<24}  val loss {fixed_final['val_loss']:.4f}  test acc {fixed_final['test_acc']:.1%}")
    return dict(lrs=lrs, val_losses=val_losses, final_lr=final_lr, learned=learned, fixed_start=fixed_start,
                fixed_final=fixed_final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inner", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--outer-steps", type=int, default=60)
    parser.add_argument("--unroll", type=int, default=10)
    parser.add_argument("--lr0", type=float, default=1e-4)
    parser.add_argument("--outer-lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="20 outer steps of 5 inner steps (for CI)")
    parser.add_argument("--plot", default=None, help="save the lr and val-loss trajectories here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_every = 5
    if args.smoke:
        args.outer_steps, args.unroll, args.outer_lr, print_every = 20, 5, 0.3, 2
    res = train(inner=args.inner, outer_steps=args.outer_steps, unroll=args.unroll, lr0=args.lr0,
                outer_lr=args.outer_lr, seed=args.seed, verbose=True, print_every=print_every)
    if args.plot:
        plot(res, args.unroll, args.plot)


def plot(res: dict, unroll: int, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no figure written to {path})")
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [unroll * k for k in range(len(res["lrs"]))]
    ax[0].semilogy(steps, res["lrs"])
    ax[0].set_title("learned lr (hypergradient descent on log lr)")
    ax[1].semilogy([unroll * (k + 1) for k in range(len(res["val_losses"]))], res["val_losses"])
    ax[1].set_title("validation loss after each unroll")
    for a in ax:
        a.set_xlabel("inner step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure written to {path}")


if __name__ == "__main__":
    main()
