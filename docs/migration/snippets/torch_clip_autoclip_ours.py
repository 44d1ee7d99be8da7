# gradxform: the same AutoClip steps; torch-clip's quantile is method="inverted_cdf".
import torch

import gradxform as gx

tx = gx.clipped_sgd(1.0, rule="auto", q=0.5)  # or gx.chain(gx.autoclip(0.5, method="inverted_cdf"), ...)
params = {"p": torch.zeros(2, dtype=torch.float64)}
state = tx.init(params)
factors = []
for n in (5.0, 1.0, 10.0, 0.5, 2.0, 8.0):  # gradient norms; direction (0.6, 0.8)
    g = n * torch.tensor([0.6, 0.8], dtype=torch.float64)
    updates, state = tx.update({"p": g}, state, params)
    params = gx.apply_updates(params, updates)
    factors.append(round((updates["p"].norm() / g.norm()).item(), 4))
print("clip factors:", factors)
