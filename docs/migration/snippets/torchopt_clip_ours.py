# gradxform: the same hypergradient; the clip factor is a tensor, so its derivative is included.
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import gradxform as gx

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
data = [(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))) for _ in range(6)]
params0 = {k: v.detach() for k, v in net.named_parameters()}


def loss(params, batch):
    return F.cross_entropy(functional_call(net, params, (batch[0],)), batch[1])


def val_loss_after_5_steps(lr):
    tx = gx.chain(gx.clip_by_global_norm(0.1), gx.sgd(0.5))
    params = params0
    state = gx.set_hyperparam(tx.init(params), "lr", lr)
    for batch in data[:5]:
        updates, state = tx.update(grad(loss)(params, batch), state, params)
        params = gx.apply_updates(params, updates)
    return loss(params, data[5])


lr = torch.tensor(0.5, dtype=torch.float64)
val, hg = val_loss_after_5_steps(lr).item(), grad(val_loss_after_5_steps)(lr).item()
h = 1e-6
fd = (val_loss_after_5_steps(lr + h) - val_loss_after_5_steps(lr - h)).item() / (2 * h)
print(f"val loss {val:.10f}, d val / d lr {hg:.10f}")
print(f"central finite difference:            {fd:.10f}")
