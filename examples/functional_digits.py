"""Train an MLP on scikit-learn's digits with a pure functional loop (no torch.optim).

    loss_and_grads = torch.func.grad_and_value(loss_fn)     # loss_fn(params, x, y)
    state = tx.init(params)
    for each mini-batch:
        grads, loss = loss_and_grads(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)

with ``tx = gx.chain(gx.clip_by_global_norm(5.0), gx.sgd(0.05, momentum=0.9, weight_decay=1e-4))``.
Params are a plain ``dict`` of tensors fed to the module through ``torch.func.functional_call``;
nothing is updated in place. ``train()`` is importable (the tests call it).

Run:  python examples/functional_digits.py [--epochs 15] [--seed 0]     (needs scikit-learn)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import gradxform as gx
from digits_data import load_data

BATCH_SIZE = 64


def train(epochs: int = 15, seed: int = 0, lr: float = 0.05, verbose: bool = False) -> dict:
    """Train a 64-128-10 MLP; return ``dict(train_acc=, test_acc=, losses=[mean loss per epoch])``."""
    X_tr, y_tr, X_te, y_te = load_data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def accuracy(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return (functional_call(model, p, (X,)).argmax(1) == y).float().mean().item()

    grad_and_loss = grad_and_value(loss_fn)
    tx = gx.chain(gx.clip_by_global_norm(5.0), gx.sgd(lr, momentum=0.9, weight_decay=1e-4))
    state = tx.init(params)
    gen = torch.Generator().manual_seed(seed)

    losses = []
    for epoch in range(1, epochs + 1):
        total = 0.0
        for idx in torch.randperm(len(X_tr), generator=gen).split(BATCH_SIZE):
            grads, loss = grad_and_loss(params, X_tr[idx], y_tr[idx])
            updates, state = tx.update(grads, state, params)
            params = gx.apply_updates(params, updates)
            total += loss.item() * len(idx)
        losses.append(total / len(X_tr))
        if verbose:
            print(f"epoch {epoch:3d}  loss {losses[-1]:.4f}  train acc {accuracy(params, X_tr, y_tr):6.1%}  "
                  f"test acc {accuracy(params, X_te, y_te):6.1%}")
    return dict(train_acc=accuracy(params, X_tr, y_tr), test_acc=accuracy(params, X_te, y_te), losses=losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = train(epochs=args.epochs, seed=args.seed, verbose=True)
    print(f"final: train accuracy {result['train_acc']:.1%}, test accuracy {result['test_acc']:.1%}")


if __name__ == "__main__":
    main()
