# empirical_init (the package): wrap each layer in Normed, tune on dummy batches, keep the wrappers.
import contextlib
import io
import warnings

import torch
import torch.nn.functional as F
from empirical_init import Normed, empirical_init, get_wrapped_submodules


def mlp(depth):                                       # `depth` hidden ReLU layers of width 32
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(32, 32), torch.nn.ReLU())]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 10))


def tune(depth):
    torch.manual_seed(0)
    model = mlp(depth)
    for i, m in enumerate(model):
        if isinstance(m, torch.nn.Linear):
            model[i] = Normed(m)                      # the multipliers live in the wrappers
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))       # count full forward passes
    get_input = lambda b: torch.randn(b, 32)
    get_loss = lambda out: F.cross_entropy(out, torch.randint(0, 10, (out.shape[0],)))
    with contextlib.redirect_stdout(io.StringIO()) as printed, warnings.catch_warnings():
        warnings.simplefilter("ignore")               # its full-backward-hook warning
        empirical_init(get_wrapped_submodules(model), model, get_input, get_loss)
    rms = []                                          # pillar 1 on a fresh batch: RMS of each layer's output
    for m in get_wrapped_submodules(model):
        m.register_forward_hook(lambda m, i, out: rms.append(float(out.square().mean().sqrt())))
    with torch.no_grad():
        model(torch.randn(256, 32))
    print(f"{depth + 1} Linear layers: {len(passes) - 1} forward passes; "
          f"layer output RMS {min(rms):.3f}-{max(rms):.3f}; printed {len(printed.getvalue().splitlines())} lines")


for depth in (4, 8):
    tune(depth)
