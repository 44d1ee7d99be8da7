# gradxform: one call returns plain params for the unmodified module plus per-tensor multipliers.
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gradxform as gx


def mlp(depth):                                       # `depth` hidden ReLU layers of width 32
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(32, 32), torch.nn.ReLU())]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 10))


def tune(depth):
    torch.manual_seed(0)
    model = mlp(depth)
    params = {k: v.detach() for k, v in model.named_parameters()}
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))       # count full forward passes
    dummy = ((torch.randn(64, 32), torch.randint(0, 10, (64,))) for _ in range(100))
    new_params, multipliers, report = gx.empirical_init(model, params, dummy, F.cross_entropy)
    rms = []                                          # pillar 1 on a fresh batch: RMS of each layer's output
    for m in model:
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, i, out: rms.append(float(out.square().mean().sqrt())))
    with torch.no_grad():
        functional_call(model, new_params, (torch.randn(256, 32),))
    print(f"{depth + 1} Linear layers: {len(passes) - 1} forward passes; "
          f"layer output RMS {min(rms):.3f}-{max(rms):.3f}; "
          f"report: {report.forward_passes} forward / {report.backward_passes} backward")
    return new_params, multipliers


for depth in (4, 8):
    new_params, multipliers = tune(depth)

# train with the multipliers in front of the optimizer (c_l * a_l^2 per tensor; docs/init-scale.md)
tx = gx.chain(gx.scale_by_empirical_init(multipliers), gx.sgd(1e-3, momentum=0.9))
