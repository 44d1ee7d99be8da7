# gradxform: the same loop.
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

import gradxform as gx

torch.manual_seed(0)
x = torch.randn(256, 8)
y = x[:, :2].pow(2).sum(1, keepdim=True) + 0.1 * torch.randn(256, 1)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
params = {k: v.detach().clone() for k, v in model.named_parameters()}


def loss_fn(params):
    return F.mse_loss(functional_call(model, params, (x,)), y)


tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adam(1e-2))
state = tx.init(params)
for _ in range(50):
    grads, loss = grad_and_value(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    params = gx.apply_updates(params, updates)

print(f"loss after 50 steps: {loss.item():.8f}")
print(f"first weights: {[round(v, 8) for v in params['0.weight'][0, :3].tolist()]}")
