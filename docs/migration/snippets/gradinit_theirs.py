# gradinit (the package): wrap the module, train the scale parameters it adds, then detach.
import math

import torch
import torch.nn.functional as F
from gradinit import GradInitWrapper

torch.manual_seed(0)
layers = []
for _ in range(10):                                   # 10 hidden ReLU layers, no normalisation
    lin = torch.nn.Linear(32, 32)
    torch.nn.init.normal_(lin.weight, std=math.sqrt(8 / 32))    # twice the He std: explodes
    torch.nn.init.zeros_(lin.bias)
    layers += [lin, torch.nn.ReLU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))
teacher = torch.randn(32, 4)
batches = [(x, (x @ teacher).argmax(1)) for x in torch.randn(60, 64, 32)]
x_eval = torch.randn(256, 32)
y_eval = (x_eval @ teacher).argmax(1)


def grad_norm():                                      # ||g||_2 of the training loss, held-out batch
    model.zero_grad()
    F.cross_entropy(model(x_eval), y_eval).backward()
    return math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))


print(f"||g||_2 at init: {grad_norm():.1f}")

wrapper = GradInitWrapper(model)                      # params -> plain tensors + pre-forward hooks
opt = torch.optim.Adam(model.parameters(), lr=0.01)   # only the scales are Parameters now
for x, y in batches:
    loss = wrapper.grad_loss(F.cross_entropy(model(x), y), norm=2, gamma=1.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    wrapper.clamp_scales(0.01)
scales = {n.removesuffix("_gradinit_scale_factor"): float(p.detach()) for n, p in model.named_parameters()}
wrapper.detach()                                      # folds the scales in; call it, never rely on `del`

hidden = [scales[f"{i}.weight"] for i in range(0, 20, 2)]
print(f"weight scales: hidden {min(hidden):.4f}-{max(hidden):.4f}, head {scales['20.weight']:.4f}")
print(f"||g||_2 after: {grad_norm():.3f}")
