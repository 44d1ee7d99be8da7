# torchopt: its Adam class next to torch.optim's tools, and its functional update under torch.compile.
import torch
import torchopt

model = torch.nn.Linear(8, 1)
opt = torchopt.Adam(model.parameters(), lr=1e-2)
print(f"a torch.optim.Optimizer: {isinstance(opt, torch.optim.Optimizer)}")
try:
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
except TypeError as e:
    print(f"CosineAnnealingLR: TypeError: {e}")

tx = torchopt.adam(1e-2)


@torch.compile(fullgraph=True)
def update_step(params, state, grads):
    updates, state = tx.update(grads, state, params=params, inplace=False)
    return torchopt.apply_updates(params, updates, inplace=False), state


params = {"w": torch.ones(8)}
grads = {"w": torch.linspace(-1.0, 1.0, 8)}
try:
    update_step(params, tx.init(params), grads)
except torch._dynamo.exc.Unsupported as e:
    print(f"torch.compile(fullgraph=True): Unsupported: {str(e).splitlines()[0]}")
