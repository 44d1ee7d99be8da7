# gradxform: gx.Optimizer is a torch.optim.Optimizer, and the functional update compiles.
import torch

import gradxform as gx

model = torch.nn.Linear(8, 1)
opt = gx.Optimizer(model.parameters(), gx.adam(1e-2))
print(f"a torch.optim.Optimizer: {isinstance(opt, torch.optim.Optimizer)}")
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
model(torch.ones(1, 8)).sum().backward()
opt.step()
sched.step()
print(f"CosineAnnealingLR: lr after one step {opt.param_groups[0]['lr']:.8f}")

tx = gx.adam(1e-2)


@torch.compile(fullgraph=True)
def update_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return gx.apply_updates(params, updates), state


params = {"w": torch.ones(8)}
grads = {"w": torch.linspace(-1.0, 1.0, 8)}
compiled, _ = update_step(params, tx.init(params), grads)
updates, _ = tx.update(grads, tx.init(params), params)
eager = gx.apply_updates(params, updates)
print(f"torch.compile(fullgraph=True): compiled == eager: {torch.allclose(compiled['w'], eager['w'], rtol=1e-6)}")
