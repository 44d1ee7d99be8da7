# torchopt: a functional loop, clip_grad_norm + Adam, with torch.func.
import torch
import torch.nn.functional as F
import torchopt
from torch.func import functional_call, grad_and_value

torch.manual_seed(0)
x = torch.randn(256, 8)
y = x[:, :2].pow(2).sum(1, keepdim=True) + 0.1 * torch.randn(256, 1)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
params = {k: v.detach().clone() for k, v in model.named_parameters()}


def loss_fn(params):
    return F.mse_loss(functional_call(model, params, (x,)), y)


tx = torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.adam(1e-2))
state = tx.init(params)
for _ in range(50):
    grads, loss = grad_and_value(loss_fn)(params)
    updates, state = tx.update(grads, state, params=params, inplace=False)
    params = torchopt.apply_updates(params, updates, inplace=False)

print(f"loss after 50 steps: {loss.item():.8f}")
print(f"first weights: {[round(v, 8) for v in params['0.weight'][0, :3].tolist()]}")
