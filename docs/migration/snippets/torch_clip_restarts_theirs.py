# torch-clip: Restarter around SGD(lr=1), restart after first_restart_steps_cnt + 1 = 3 steps.
import torch
from torch_clip.optimizers_collector import OptimizerProperties
from torch_clip.restarter import Restarter

model = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.tensor([1.0, 2.0])),
                                "b": torch.nn.Parameter(torch.tensor([10.0]))})
props = OptimizerProperties(torch.optim.SGD, lr=1.0)
restarter = Restarter(props, first_restart_steps_cnt=2, restart_coeff=2.0)
opt = props.optimizer_class(model.parameters(), **props.optimizer_kwargs)
for _ in range(3):  # constant gradients a: (1, 1), b: (2)
    model["a"].grad, model["b"].grad = torch.tensor([1.0, 1.0]), torch.tensor([2.0])
    opt.step()
    restarter.add_coords(model.parameters())
    opt = restarter.make_restart(model, opt)
print("after the restart: a", model["a"].tolist(), "b", model["b"].tolist())
