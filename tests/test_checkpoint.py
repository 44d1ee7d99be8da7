"""Checkpoints: every public transform's state saved with ``gx.state_to_dict`` (``torch.save`` with
``weights_only=True``, and ``torch.distributed.checkpoint``) resumes bit-exactly; the adapter's
``state_dict`` carries the format version; mismatches and newer formats give clear errors."""

from __future__ import annotations

import io

import pytest
import torch

import gradxform as gx
from helpers import assert_trees_equal, make_mlp, needs
from test_purity import CASES, KNOWN_GAPS, _grads, _params


def _steps(tx, params, state, seeds):
    for s in seeds:
        updates, state = tx.update(_grads(s), state, params)
        params = gx.apply_updates(params, updates)
    return params, state


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_is_bit_exact(name):
    if name in KNOWN_GAPS.get("checkpoint", {}):
        pytest.skip(KNOWN_GAPS["checkpoint"][name])
    tx = CASES[name]()
    p0 = _params()
    straight_p, straight_s = _steps(tx, p0, tx.init(p0), range(6))

    p, s = _steps(tx, p0, tx.init(p0), range(3))
    saved = _roundtrip({"params": p, "opt": gx.state_to_dict(s)})
    assert saved["opt"]["format"] == "gradxform.state" and saved["opt"]["version"] == 2
    restored = gx.state_from_dict(tx.init(p0), saved["opt"])
    assert_trees_equal(restored, s)
    p, s = _steps(tx, saved["params"], restored, range(3, 6))
    assert_trees_equal(p, straight_p)
    assert_trees_equal(s, straight_s)


def test_saved_paths_name_the_fields():
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.1))
    d = gx.state_to_dict(tx.init(_params()))
    assert "1.inner_state.0.mu.w" in d["tensors"] and "1.inner_state.0.nu.b" in d["tensors"]
    assert d["types"]["1.inner_state.0"] == "ScaleByAdamState"
    assert all(isinstance(k, str) for k in d["tensors"])


def test_a_version_1_rprop_state_loads_with_the_new_meaning():
    """Version 1 stored a not-yet-stepped leaf's Rprop step sizes as the initial lr; version 2
    stores 1 (the first step multiplies by that step's lr). A version-1 dict, as the former code
    wrote it, resumes equal to the uninterrupted run; the stepped leaf is left as it was."""
    tx = gx.rprop(0.05)
    p0 = {"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    grads = [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64),
              "b": None if k < 2 else torch.randn(2, generator=g, dtype=torch.float64)} for k in range(5)]

    def run(params, state, ks):
        for k in ks:
            u, state = tx.update(grads[k], state, params)
            params = gx.apply_updates(params, u)
        return params, state

    straight, _ = run(p0, tx.init(p0), range(5))
    p, s = run(p0, tx.init(p0), range(2))
    saved = gx.state_to_dict(s)
    old = {**saved, "version": 1, "tensors": dict(saved["tensors"])}
    old["tensors"]["inner_state.0.step_sizes.b"] = torch.full((2,), 0.05, dtype=torch.float64)  # version 1's value
    restored = gx.state_from_dict(tx.init(p0), _roundtrip(old))
    assert torch.equal(restored.inner_state[0].step_sizes["b"], torch.ones(2, dtype=torch.float64))
    assert torch.equal(restored.inner_state[0].step_sizes["w"], s.inner_state[0].step_sizes["w"])
    resumed, _ = run(p, restored, range(2, 5))
    assert_trees_equal(resumed, straight)


def test_mismatches_are_named():
    p = _params()
    adam = gx.state_to_dict(gx.adam(0.1).init(p))
    with pytest.raises(ValueError, match="ScaleByAdamState.*TraceState|saved from a"):
        gx.state_from_dict(gx.sgd(0.1, momentum=0.9).init(p), adam)
    with pytest.raises(ValueError, match="not a gradxform state dict"):
        gx.state_from_dict(gx.adam(0.1).init(p), {"state": {}})
    with pytest.raises(ValueError, match="version 3.*up to 2.*newer gradxform"):
        gx.state_from_dict(gx.adam(0.1).init(p), {**adam, "version": 3})
    wide = {**p, "w": torch.zeros(5, 2)}
    with pytest.raises(ValueError, match=r"'inner_state.0.mu.w' has shape \(3, 2\).*\(5, 2\)"):
        gx.state_from_dict(gx.adam(0.1).init(wide), adam)
    more = {**p, "extra": torch.zeros(2)}
    with pytest.raises(KeyError, match="no tensor at '.*extra'"):
        gx.state_from_dict(gx.adam(0.1).init(more), adam)
    fewer = {k: v for k, v in p.items() if k != "frozen"}
    with pytest.raises(ValueError, match="a tensor at '.*frozen' that"):
        gx.state_from_dict(gx.adam(0.1).init(fewer), adam)
    bad = {**adam, "tensors": {**adam["tensors"]}}
    count = next(k for k, v in bad["tensors"].items() if v.dtype == torch.int64)
    bad["tensors"][count] = bad["tensors"][count].float()
    with pytest.raises(ValueError, match=f"'{count}' has dtype torch.float32"):
        gx.state_from_dict(gx.adam(0.1).init(p), bad)


def test_floating_state_is_cast_to_the_template_dtype():
    """As torch.optim does on load: a float64 checkpoint into a float32 run."""
    p64 = {k: v.double() for k, v in _params().items()}
    tx = gx.adam(0.1)
    _, s = _steps(tx, p64, tx.init(p64), [])
    s = tx.update({k: (None if v is None else v.double()) for k, v in _grads(0).items()}, s, p64)[1]
    restored = gx.state_from_dict(tx.init(_params()), gx.state_to_dict(s))
    mu = restored.inner_state[0].mu["w"]
    assert mu.dtype == torch.float32
    torch.testing.assert_close(mu, s.inner_state[0].mu["w"].float())


@needs("dcp_save")
def test_torch_distributed_checkpoint_roundtrip(tmp_path):
    """``torch.distributed.checkpoint`` in one process: save the dict, load it into a template."""
    import torch.distributed.checkpoint as dcp
    tx = CASES["chain"]()
    p0 = _params()
    p, s = _steps(tx, p0, tx.init(p0), range(3))
    dcp.save({"opt": gx.state_to_dict(s)}, checkpoint_id=str(tmp_path / "ckpt"))
    template = {"opt": gx.state_to_dict(tx.init(p0))}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    assert template["opt"]["version"] == 2
    assert_trees_equal(gx.state_from_dict(tx.init(p0), template["opt"]), s)


# --- the adapter --------------------------------------------------------------------------------


def _trained(steps=3):
    model = make_mlp(0)
    opt = gx.Optimizer(model.parameters(), gx.chain(gx.autoclip(0.5, history=4), gx.adamw(1e-2)))
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return model, opt


def test_adapter_state_dict_is_plain_data_and_round_trips():
    """torch.optim's layout with plain values only (it loads with weights_only=True); a fresh
    optimizer restores the same transform state from it."""
    _, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    for g in sd["param_groups"]:
        assert all(isinstance(v, (int, float, bool, tuple, list, type(None))) for k, v in g.items() if k != "tx_state")
        assert all(isinstance(v, torch.Tensor) for v in g["tx_state"].values())
    fresh = gx.Optimizer(make_mlp(0).parameters(), gx.chain(gx.autoclip(0.5, history=4), gx.adamw(1e-2)))
    fresh.load_state_dict(sd)
    assert_trees_equal(fresh.tx_state(), opt.tx_state())


def test_adapter_init_state_gives_a_full_template():
    model, opt = _trained()
    fresh = gx.Optimizer(make_mlp(0).parameters(), gx.chain(gx.autoclip(0.5, history=4), gx.adamw(1e-2)))
    assert fresh.state_dict()["state"] == {}
    fresh.init_state()
    template = fresh.state_dict()
    saved = opt.state_dict()
    assert set(template["state"]) == set(saved["state"])
    assert all(set(template["state"][i]) == set(saved["state"][i]) for i in saved["state"])
    # and the init state is the one a first step starts from
    twin = gx.Optimizer(make_mlp(0).parameters(), gx.chain(gx.autoclip(0.5, history=4), gx.adamw(1e-2)))
    for a, b in zip(fresh.param_groups[0]["params"], twin.param_groups[0]["params"]):
        a.grad = b.grad = torch.ones_like(a)
    fresh.step()
    twin.step()
    assert_trees_equal(fresh.tx_state(), twin.tx_state())
