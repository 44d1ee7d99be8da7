# gradxform: GradNorm is a transform in front of the optimizer; the network gets grad sum_i w_i L_i.
import torch
import torch.nn.functional as F

import gradxform as gx


def make():                                           # shared trunk, two heads; task 0 learnable, task 1 noise
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(32, 1), torch.nn.Linear(32, 1)])
    for head in heads:                                # small heads: both losses start at their targets' variance
        torch.nn.init.normal_(head.weight, std=0.05)
        torch.nn.init.zeros_(head.bias)
    teacher = torch.randn(8)
    batches = [(x, torch.stack([torch.tanh(x @ teacher), torch.randn(64)], 1)) for x in torch.randn(150, 64, 8)]
    return trunk, heads, batches


def task_losses(trunk, heads, x, y):
    h = trunk(x)
    return torch.stack([F.mse_loss(heads[i](h).squeeze(1), y[:, i]) for i in range(2)])


for alpha in (0.0, 1.5):
    trunk, heads, batches = make()
    opt = gx.Optimizer([*trunk.parameters(), *heads.parameters()],
                       gx.chain(gx.gradnorm(num_tasks=2, alpha=alpha, weight_tx=gx.sgd(0.02)), gx.sgd(0.1)))
    for step, (x, y) in enumerate(batches):
        losses = task_losses(trunk, heads, x, y)
        if step == 0:
            first = losses.detach()
        norms = gx.task_grad_norms(losses, trunk[2].weight)       # n_i at the shared weight W
        opt.zero_grad()
        (gx.loss_weights(opt) * losses).sum().backward()
        if step == 0:
            g0 = float(trunk[0].weight.grad.norm())   # the network's step-0 gradient, first layer
        opt.step(losses=losses.detach(), task_grad_norms=norms)
    w, ratio = gx.loss_weights(opt).tolist(), (losses.detach() / first).tolist()
    print(f"alpha {alpha}: step-0 |grad trunk[0].weight| {g0:.4f}; weights {w[0]:.4f} {w[1]:.4f}; "
          f"L/L0 {ratio[0]:.3f} {ratio[1]:.3f}")
