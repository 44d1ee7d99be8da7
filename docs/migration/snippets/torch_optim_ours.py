# gradxform: the same run through gx.Optimizer; the clip is the first member of the chain.
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
print(f"gradxform_format: {sd['param_groups'][0]['gradxform_format']}")
print(f"opt.state: {dict(opt.state)}; Adam's mu of param 0: {tuple(opt.tx_state(0)[1].inner_state[0].mu[0].shape)}")

# A torch.optim.AdamW state dict is refused with a reason, not loaded under the wrong names.
torch_sd = torch.optim.AdamW(model.parameters()).state_dict()
try:
    opt.load_state_dict(torch_sd)
except ValueError as e:
    print(f"loading torch.optim.AdamW's state dict: ValueError: {str(e).split(':')[0]}")
