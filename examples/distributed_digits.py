"""Data-parallel training on two CPU processes (gloo): FSDP2 or DDP, a gradxform chain through
``gx.Optimizer``, a sharded ``torch.distributed.checkpoint`` halfway and a resume, compared with
the same run in one process.

    python examples/distributed_digits.py                 # FSDP2 (fully_shard), 2 ranks
    python examples/distributed_digits.py --mode ddp      # DistributedDataParallel
    python examples/distributed_digits.py --smoke         # a few steps

Each rank takes half of every batch; the optimizer is ``chain(autoclip, adamw)``: AutoClip's
norm history must be the norm of the *whole* gradient, which under FSDP2 lives in shards on the
two ranks. Printed: the test accuracy, the largest parameter difference to the one-process run
(rounding only), and whether the resumed run continued bit-exactly. FSDP2 with gradxform needs
torch >= 2.8; torch 2.8's FSDP2 itself sums float32 gradients over gloo ranks instead of
averaging them, so there the two runs differ (docs/support.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gradxform as gx  # noqa: E402
from digits_data import load_data  # noqa: E402


def make_tx() -> gx.GradientTransformation:
    return gx.chain(gx.autoclip(0.9, history=50), gx.adamw(3e-3, weight_decay=1e-4))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def wrap(model: nn.Module, mode: str) -> nn.Module:
    """Shard (FSDP2) or replicate (DDP) ``model``; ``mode="single"``: as it is."""
    if mode == "fsdp":
        try:  # public from torch 2.6; torch.distributed._composable.fsdp in 2.4-2.5
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return model


def batches(steps: int, rank: int, world: int, batch: int = 64):
    """The same global batches in every process; this rank's contiguous share of each."""
    x, y, _, _ = load_data(0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        part = idx[rank * batch // world:(rank + 1) * batch // world]
        yield x[part], y[part]


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if gx.tree.is_dtensor(p) else p


def train(mode: str, rank: int, world: int, steps: int, ckpt: str | None) -> dict:
    """``steps`` steps; with ``ckpt``, save after half of them, rebuild model and optimizer from
    the checkpoint, and finish with the restored ones."""
    model = make_model()
    net = wrap(model, mode)
    opt = gx.Optimizer(model.parameters(), make_tx())
    half = steps // 2
    for k, (x, y) in enumerate(batches(steps, rank, world)):
        if ckpt is not None and k == half:
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
            model = make_model()  # a fresh model and optimizer, filled from the checkpoint
            net = wrap(model, mode)
            opt = gx.Optimizer(model.parameters(), make_tx())
            opt.init_state()  # the template dcp.load fills in place
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            dcp.load(state, checkpoint_id=ckpt)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    _, _, xt, yt = load_data(0)
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    history = next(t for t in gx.tree.tree_flatten(opt.tx_state())[0]
                   if isinstance(t, torch.Tensor) and t.ndim == 1 and t.numel() == 50)
    return {"params": [full(p.detach()).clone() for p in model.parameters()], "acc": acc,
            "norm_history": history.clone()}


def worker(rank: int, world: int, init_file: str, out: str, mode: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        box = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        straight = train(mode, rank, world, steps, None)
        resumed = train(mode, rank, world, steps, os.path.join(box[0], "ckpt"))
        if rank == 0:
            torch.save({"straight": straight, "resumed": resumed}, out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--smoke", action="store_true", help="20 steps")
    args = ap.parse_args(argv)
    steps = 20 if args.smoke else args.steps
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(worker, args=(world, os.path.join(tmp, "rendezvous"), out, args.mode, steps), nprocs=world)
        ranks = torch.load(out, weights_only=False)
    torch.set_num_threads(1)
    single = train("single", 0, 1, steps, None)
    diff = max(float((a - b).abs().max()) for a, b in zip(ranks["straight"]["params"], single["params"]))
    exact = all(torch.equal(a, b) for a, b in zip(ranks["resumed"]["params"], ranks["straight"]["params"]))
    hist = float((ranks["straight"]["norm_history"] - single["norm_history"]).abs().max())
    print(f"mode: {args.mode}, 2 ranks x half batches, {steps} steps of chain(autoclip, adamw)")
    print(f"test accuracy: 2 ranks {ranks['straight']['acc']:.4f} | one process {single['acc']:.4f}")
    print(f"max abs param difference, 2 ranks vs one process: {diff:.3g}")
    print(f"max abs difference of AutoClip's norm history: {hist:.3g}")
    print(f"resumed from a sharded checkpoint at step {steps // 2}: bit-exact = {exact}")
    return {"diff": diff, "hist_diff": hist, "exact": exact, "acc": ranks["straight"]["acc"], "single_acc": single["acc"]}


if __name__ == "__main__":
    main()
