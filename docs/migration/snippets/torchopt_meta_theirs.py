# torchopt: d(validation loss after 5 unrolled Adam steps) / d(lr) with MetaAdam.
import copy

import torch
import torch.nn.functional as F
import torchopt

torch.manual_seed(0)
net0 = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
data = [(torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))) for _ in range(6)]


def hypergradient():
    net = copy.deepcopy(net0)
    lr = torch.tensor(1e-2, dtype=torch.float64, requires_grad=True)
    opt = torchopt.MetaAdam(net, lr=lr)
    for x, y in data[:5]:
        opt.step(F.cross_entropy(net(x), y))  # differentiable update: params keep their history
    x, y = data[5]
    val = F.cross_entropy(net(x), y)
    val.backward()
    return val.item(), lr.grad.item()


val, hg = hypergradient()
print(f"val loss {val:.10f}, d val / d lr {hg:.10f}")
torch.set_default_dtype(torch.float64)  # torchopt's bias corrections follow the default dtype
val, hg = hypergradient()
print(f"with float64 default dtype: val loss {val:.10f}, d val / d lr {hg:.10f}")
