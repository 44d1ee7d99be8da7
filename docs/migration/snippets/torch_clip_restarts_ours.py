# gradxform: with_restarts around sgd(1.0); the iterates are a (0, 1), (-1, 0), (-2, -1) and b 8, 6, 4.
import torch

import gradxform as gx

tx = gx.with_restarts(gx.sgd(1.0), first_period=2, coeff=2.0)
params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0])}
state = tx.init(params)
for _ in range(3):  # constant gradients a: (1, 1), b: (2)
    grads = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}
    updates, state = tx.update(grads, state, params)
    params = gx.apply_updates(params, updates)
print("after the restart: a", params["a"].tolist(), "b", params["b"].tolist())
