# gradxform: plain torch.nn layers; the statistic comes from hooks and is passed to step() explicitly.
import torch
import torch.nn.functional as F

import gradxform as gx


def make():                                           # the same start and batches on both sides
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    batches = [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(50)]
    return model, batches


for graft in (True, False):
    model, batches = make()
    opt = gx.Optimizer(model.parameters(), gx.tg_adamw(lr=1e-2, weight_decay=0.0, graft=graft))
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        with gx.track_sum_grad_squared(model) as stats:
            F.cross_entropy(model(x), y).backward()
        S = stats.sum_grad_squared                    # a gx.PerParam: param -> sum_n (grad l_n / N)^2
        if step == 0 and graft:
            print("S at step 0 (sum over each tensor):",
                  " ".join(f"{n} {float(S[p].sum()):.6g}" for n, p in model.named_parameters()))
        opt.step(sum_grad_squared=S)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(batches[0][0]), batches[0][1]))
    print(f"TGAdamW(graft={graft}), after 50 steps: loss on batch 0 {loss:.6f}")

# weight decay alone: zero gradients and statistics, lr 0.1, weight_decay 0.1, one step
model, _ = make()
w0 = model[0].weight.detach().clone()
opt = gx.Optimizer(model.parameters(), gx.tg_adamw(lr=0.1, weight_decay=0.1))
for p in model.parameters():
    p.grad = torch.zeros_like(p)
opt.step(sum_grad_squared=gx.PerParam([(p, torch.zeros_like(p)) for p in model.parameters()]))
print(f"decay factor of 0.weight after one step: {float((model[0].weight.detach() / w0).mean()):.6f}")
