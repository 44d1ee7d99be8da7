"""gradxform in one page: the same optimiser, used functionally and as a torch.optim.Optimizer.

Trains a small MLP (64 -> 128 -> 10) on scikit-learn's handwritten digits with

    tx = gx.chain(gx.clip_by_global_norm(1.0),
                  gx.adamw(gx.warmup_cosine_decay_schedule(...), weight_decay=1e-4))

two ways, from the same initial weights and on the same mini-batches in the same order:

  (a) a pure functional loop: ``torch.func.functional_call`` + ``torch.func.grad_and_value``,
      ``state = tx.init(params)``, ``tx.update``, ``gx.apply_updates``;
  (b) the same ``tx`` behind ``gx.Optimizer(model.parameters(), tx)`` in an ordinary
      ``loss.backward(); opt.step()`` loop.

Per epoch it prints the mean training loss, train/test accuracy, how many steps had their
gradient clipped (global grad norm > 1.0, measured with ``gx.tree_global_norm`` before the update)
and the learning rate in effect (functional: read from the adamw member's
``InjectHyperparamsState.hyperparams["lr"]``; adapter: ``opt.param_groups[0]["lr"]``). At the end
it reports the largest absolute difference between the parameters the two ways arrive at.

Run:  python examples/two_ways.py [--epochs 20] [--seed 0]        (needs scikit-learn)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import gradxform as gx
from digits_data import load_data

MAX_NORM = 1.0
PEAK_LR = 3e-3
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 64


def batches(n: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """The shuffled mini-batch indices of one epoch; both ways get exactly these."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(BATCH_SIZE))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batches")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and the run is reproducible
    t0 = time.perf_counter()

    X_tr, y_tr, X_te, y_te = load_data(args.seed)
    steps_per_epoch = -(-len(X_tr) // BATCH_SIZE)
    total_steps = args.epochs * steps_per_epoch
    warmup = max(1, total_steps // 10)
    schedule = gx.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=PEAK_LR, warmup_steps=warmup, decay_steps=total_steps, end_value=PEAK_LR / 100
    )
    tx = gx.chain(gx.clip_by_global_norm(MAX_NORM), gx.adamw(schedule, weight_decay=WEIGHT_DECAY))

    torch.manual_seed(args.seed)
    model_a = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model_b = copy.deepcopy(model_a)  # (b) trains this module in place; (a) only borrows its structure

    # (a) functional: params are a dict pytree, the state is (clip's EmptyState, adamw's
    # InjectHyperparamsState); nothing is mutated.
    params = {k: v.detach().clone() for k, v in model_a.named_parameters()}
    state = tx.init(params)

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model_a, p, (x,)), y)

    grad_and_loss = grad_and_value(loss_fn)

    # (b) the same transform as a torch.optim.Optimizer.
    opt = gx.Optimizer(model_b.parameters(), tx)

    print(f"gradxform {gx.__version__} demo: digits, {len(X_tr)} train / {len(X_te)} test, MLP 64-128-10, "
          f"{steps_per_epoch} steps/epoch, seed {args.seed}")
    print(f"tx = chain(clip_by_global_norm({MAX_NORM}), adamw(warmup_cosine_decay(0 -> {PEAK_LR:g} in {warmup} "
          f"steps -> {PEAK_LR / 100:g} at step {total_steps}), weight_decay={WEIGHT_DECAY:g}))")
    print()
    header_a = "(a) functional_call + grad_and_value"
    header_b = "(b) gx.Optimizer + loss.backward()"
    cols = f"{'lr':>8}  {'loss':>6}  {'train':>6}  {'test':>6}  {'clipped':>7}"
    print(f"{'':5}  {header_a:<{len(cols)}}    {header_b}")
    print(f"{'epoch':>5}  {cols}    {cols}")

    for epoch in range(1, args.epochs + 1):
        loss_a = loss_b = 0.0
        clipped_a = clipped_b = 0
        for idx in batches(len(X_tr), epoch, args.seed):
            x, y = X_tr[idx], y_tr[idx]

            # (a)
            grads, loss = grad_and_loss(params, x, y)
            clipped_a += int(gx.tree_global_norm(grads) > MAX_NORM)
            updates, state = tx.update(grads, state, params)
            params = gx.apply_updates(params, updates)
            loss_a += loss.item() * len(idx)

            # (b)
            opt.zero_grad()
            loss = F.cross_entropy(model_b(x), y)
            loss.backward()
            clipped_b += int(gx.tree_global_norm([p.grad for p in model_b.parameters()]) > MAX_NORM)
            opt.step()
            loss_b += loss.item() * len(idx)

        lr_a = state[1].hyperparams["lr"].item()  # state = (EmptyState(), InjectHyperparamsState(...))
        lr_b = opt.param_groups[0]["lr"]
        with torch.no_grad():
            acc_a = [accuracy(functional_call(model_a, params, (X,)), Y) for X, Y in ((X_tr, y_tr), (X_te, y_te))]
            acc_b = [accuracy(model_b(X), Y) for X, Y in ((X_tr, y_tr), (X_te, y_te))]

        def row(lr: float, loss: float, acc: list[float], clipped: int) -> str:
            frac = f"{clipped}/{steps_per_epoch}"
            return f"{lr:8.2e}  {loss / len(X_tr):6.4f}  {acc[0]:6.1%}  {acc[1]:6.1%}  {frac:>7}"

        print(f"{epoch:>5}  {row(lr_a, loss_a, acc_a, clipped_a)}    {row(lr_b, loss_b, acc_b, clipped_b)}")

    diff = max((params[k] - p).abs().max().item() for k, p in model_b.named_parameters())
    print()
    print(f"final accuracy  (a) functional: train {acc_a[0]:.1%}, test {acc_a[1]:.1%}   "
          f"(b) gx.Optimizer: train {acc_b[0]:.1%}, test {acc_b[1]:.1%}")
    verdict = "same parameters" if diff < 1e-6 else "the two ways DIVERGED"
    print(f"max abs difference between (a) and (b) parameters: {diff:.3e}  ({verdict}, tolerance 1e-6)")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
