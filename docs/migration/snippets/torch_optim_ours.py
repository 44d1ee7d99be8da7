# gradxform: the same run through gx.Optimizer; the clip is the first member of the chain.
import copy
import io

import torch
import torch.nn.functional as F

import gradxform as gx

torch.manual_seed(0)
x = torch.randn(256, 8)
y = x[:, :2].pow(2).sum(1, keepdim=True) + 0.1 * torch.randn(256, 1)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def make(model):
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(lr=3e-2, weight_decay=1e-2))
    opt = gx.Optimizer(model.parameters(), tx)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    scaler = torch.amp.GradScaler("cpu")  # "cuda" on a GPU
    return opt, sched, scaler


def train(model, opt, sched, scaler, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales, then the chain clips the true gradients
        scaler.update()
        sched.step()
    return loss.item()


opt, sched, scaler = make(model)
train(model, opt, sched, scaler, 30)
buf = io.BytesIO()
torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "scaler": scaler.state_dict()}, buf)

buf.seek(0)
ckpt = torch.load(buf)
opt, sched, scaler = make(model)  # a fresh optimizer, resumed from the checkpoint
model.load_state_dict(ckpt["model"])
opt.load_state_dict(ckpt["opt"])
sched.load_state_dict(ckpt["sched"])
scaler.load_state_dict(ckpt["scaler"])
loss = train(model, opt, sched, scaler, 30)

sd = opt.state_dict()
print(f"loss after 60 steps: {loss:.8f}")
print(f"first weights: {[round(v, 8) for v in model[0].weight[0, :3].tolist()]}")
print(f"state of param 0: {sorted(sd['state'][0])}")
print(f"group 0's own state: {sorted(sd['param_groups'][0]['tx_state'])}")

# A torch.optim.AdamW state dict (same buffers, same names) loads into the twin and continues:
# torch.optim.AdamW takes 5 steps, gx.adamw resumes from its state dict, both take 10 more.
def steps(m, o, n):
    for _ in range(n):
        o.zero_grad()
        F.mse_loss(m(x), y).backward()
        o.step()


torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
steps(model, torch_opt, 5)
twin = copy.deepcopy(model)
gx_opt = gx.Optimizer(twin.parameters(), gx.adamw(lr=1e-3, weight_decay=1e-2))
gx_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
steps(model, torch_opt, 10)
steps(twin, gx_opt, 10)
gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
print(f"torch.optim.AdamW state dict into gx.adamw, 10 more steps: max |param difference| {gap:.0e}")
