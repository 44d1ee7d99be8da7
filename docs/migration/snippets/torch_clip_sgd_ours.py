# gradxform: clipped_sgd, the same three cases; each line is the step taken (the update).
import torch

import gradxform as gx


def steps(grads, **kwargs):
    tx = gx.clipped_sgd(1.0, **kwargs)
    params = {"p": torch.zeros(2, dtype=torch.float64)}
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update({"p": torch.tensor(g, dtype=torch.float64)}, state, params)
        params = gx.apply_updates(params, updates)
        out.append([round(v, 10) for v in updates["p"].tolist()])
    return out


print("norm, level 1.0, momentum 0.9:", steps([[3.0, 4.0], [0.0, 0.1]], momentum=0.9, rule="norm", level=1.0))
print("coordinate_wise, level 2.0:", steps([[3.0, -4.0]], rule="coordinate_wise", level=2.0))
print("norm, level 2 (an int):", steps([[3.0, 4.0]], rule="norm", level=2))
try:
    steps([[3.0, 4.0]] * 3, rule="linear_rand_norm")
except ValueError as e:
    print("linear_rand_norm, level 1.0, no beta: ValueError:", str(e).split(":")[0])
print("linear_rand_norm, level 1.0, beta 0.5:", steps([[3.0, 4.0]] * 3, rule="linear_rand_norm", beta=0.5))
