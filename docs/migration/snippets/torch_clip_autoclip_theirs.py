# torch-clip: AutoClip (q = 0.5) through ClippedSGD; the clip factor of each step.
import torch
from torch_clip.optimizers import ClippedSGD

p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
opt = ClippedSGD([p], lr=1.0, clipping_type="auto_clip", p_autoclip=0.5)
factors = []
for n in (5.0, 1.0, 10.0, 0.5, 2.0, 8.0):  # gradient norms; direction (0.6, 0.8)
    g = n * torch.tensor([0.6, 0.8], dtype=torch.float64)
    before = p.detach().clone()
    p.grad = g
    opt.step()  # prints "Here!" (once per parameter tensor per step)
    factors.append(round(((before - p.detach()).norm() / g.norm()).item(), 4))
print("clip factors:", factors)
