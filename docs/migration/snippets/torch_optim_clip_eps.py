# Why the two runs are not bit-equal: clip_grad_norm_ divides by (norm + 1e-6).
# The same 60 steps in float64, torch.optim.AdamW against gx.Optimizer.
import torch
import torch.nn.functional as F

import gradxform as gx

torch.set_default_dtype(torch.float64)


def run(make_opt, clip=None):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x[:, :2].pow(2).sum(1, keepdim=True) + 0.1 * torch.randn(256, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    clipped = 0
    for _ in range(60):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if clip is not None:
            clipped += bool(clip(list(model.parameters())) > 1.0)
        opt.step()
        sched.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), clipped


def torch_clip(params):  # torch's idiom: factor min(1, 1 / (norm + 1e-6))
    return torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)


def exact_clip(params):  # optax's rule, which gx.clip_by_global_norm follows: min(1, 1 / norm)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    for p in params:
        p.grad.mul_(torch.clamp(1.0 / norm, max=1.0))
    return norm


adamw = lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=1e-2)
ours, _ = run(lambda ps: gx.Optimizer(ps, gx.chain(gx.clip_by_global_norm(1.0),
                                                      gx.adamw(lr=3e-2, weight_decay=1e-2))))
theirs, clipped = run(adamw, torch_clip)
exact, _ = run(adamw, exact_clip)
print(f"steps where the clip binds: {clipped} of 60")
print(f"max |param difference|, clip_grad_norm_: {(theirs - ours).abs().max().item():.1e}")
print(f"max |param difference|, exact clip:      {(exact - ours).abs().max().item():.1e}")
