# torch-clip: ClippedSGD on one parameter; each line is the step taken, p_new - p_old.
import torch
from torch_clip.optimizers import ClippedSGD


def steps(grads, **kwargs):
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = ClippedSGD([p], lr=1.0, **kwargs)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append([round(v, 10) for v in (p.detach() - before).tolist()])
    return out


print("norm, level 1.0, momentum 0.9:", steps([[3.0, 4.0], [0.0, 0.1]], momentum=0.9,
                                              clipping_type="norm", clipping_level=1.0))
print("coordinate_wise, level 2.0:", steps([[3.0, -4.0]], clipping_type="coordinate_wise", clipping_level=2.0))
print("norm, level 2 (an int):", steps([[3.0, 4.0]], clipping_type="norm", clipping_level=2))
print("linear_rand_norm, level 1.0, default beta:", steps([[3.0, 4.0]] * 3, clipping_type="linear_rand_norm"))
