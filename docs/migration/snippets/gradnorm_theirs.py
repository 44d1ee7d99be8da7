# gradnorm-pytorch: the weighter back-propagates the weighted loss and updates its weights itself.
import torch
import torch.nn.functional as F
from gradnorm_pytorch import GradNormLossWeighter


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
    weighter = GradNormLossWeighter(num_losses=2, learning_rate=0.04, restoring_force_alpha=alpha,
                                    grad_norm_parameters=trunk[2].weight)   # lr 0.04 = 0.02 per task (mean)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    for step, (x, y) in enumerate(batches):
        losses = task_losses(trunk, heads, x, y)
        if step == 0:
            first = losses.detach()
        opt.zero_grad()
        weighter.backward(losses)                     # weighted-loss backward + its GradNorm loss backward
        if step == 0:
            g0 = float(trunk[0].weight.grad.norm())   # the network's step-0 gradient, first layer
        opt.step()
    w, ratio = weighter.loss_weights.tolist(), (losses.detach() / first).tolist()
    print(f"alpha {alpha}: step-0 |grad trunk[0].weight| {g0:.4f}; weights {w[0]:.4f} {w[1]:.4f}; "
          f"L/L0 {ratio[0]:.3f} {ratio[1]:.3f}")
