# gradxform: a pure solver over a params dict; the module is untouched until you load the result.
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import gradxform as gx

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
params = {k: v.detach().clone() for k, v in model.named_parameters()}


def grad_norm(p):                                     # ||g||_2 of the training loss, held-out batch
    g = grad(lambda q: F.cross_entropy(functional_call(model, q, (x_eval,)), y_eval))(p)
    return math.sqrt(sum(float(v.square().sum()) for v in g.values()))


def show(label, report, new_params):
    hidden = [report.scales[f"{i}.weight"] for i in range(0, 20, 2)]
    print(f"{label}: weight scales: hidden {min(hidden):.4f}-{max(hidden):.4f}, "
          f"head {report.scales['20.weight']:.4f}; norm-branch steps {report.norm_branch_steps}; "
          f"||g||_2 after: {grad_norm(new_params):.3f}")


print(f"||g||_2 at init: {grad_norm(params):.1f}")
# 1. the package's objective and scale optimizer (plain Adam, no clip): the package's scales
same, r1 = gx.gradinit(model, params, batches, F.cross_entropy, lr=0.01, gamma=1.0, p=2, simplified=True,
                       scale_tx=gx.gradinit_scale_tx(tau=0.01, alpha=0.01, clip=None))
show("package objective, no clip", r1, same)
# 2. the same objective with the default clip of the scale gradients (docs/migration/gradinit.md, "What differs and why")
clipped, r2 = gx.gradinit(model, params, batches, F.cross_entropy, lr=0.01, gamma=1.0, p=2, simplified=True,
                          tau=0.01, alpha=0.01)
show("package objective, clip 1", r2, clipped)
# 3. the paper's objective (look-ahead SGD step on the second half of each batch), the defaults
paper, r3 = gx.gradinit(model, params, batches, F.cross_entropy, target="sgd", lr=0.01, gamma=1.0,
                        alpha=0.01, tau=0.01)
show("paper objective, clip 1", r3, paper)
model.load_state_dict(paper, strict=False)            # only now does the module change
