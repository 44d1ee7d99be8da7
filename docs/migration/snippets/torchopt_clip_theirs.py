# torchopt: a hypergradient through clip_grad_norm + SGD with a MetaOptimizer.
import copy

import torch
import torch.nn.functional as F
import torchopt

torch.manual_seed(0)
net0 = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
data = [(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))) for _ in range(6)]

net = copy.deepcopy(net0)
lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
opt = torchopt.MetaOptimizer(net, torchopt.chain(torchopt.clip_grad_norm(0.1), torchopt.sgd(lr)))
for x, y in data[:5]:
    opt.step(F.cross_entropy(net(x), y))
val = F.cross_entropy(net(data[5][0]), data[5][1])
val.backward()
print(f"val loss {val.item():.10f}, d val / d lr {lr.grad.item():.10f}")
