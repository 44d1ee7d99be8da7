"""The commonest first mistakes get an error that names the fix (issue 16, item 11): params given
as ``model.parameters()`` (a generator) or as the module itself, and a stray public name."""

from __future__ import annotations

import pytest
import torch

import gradxform as gx

HINT = "dict(model.named_parameters())"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


STATEFUL = {
    "sgd(momentum=0.9)": lambda: gx.sgd(0.1, momentum=0.9),
    "adam": lambda: gx.adam(1e-3),
    "adamw": lambda: gx.adamw(1e-3),
    "chain(clip, adamw)": lambda: gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(1e-3)),
    "autoclip": lambda: gx.autoclip(0.1),
    "tg_adamw": lambda: gx.tg_adamw(1e-3),
    "inject_hyperparams(adam)": lambda: gx.inject_hyperparams(gx.adam)(lr=1e-3),
    "apply_if_finite(adam)": lambda: gx.apply_if_finite(gx.adam(1e-3)),
    "multi_steps(adam)": lambda: gx.multi_steps(gx.adam(1e-3), 2),
    "clipped_sstm": lambda: gx.clipped_sstm(a=1.0, L=1.0, B=1.0),
    "with_restarts(sgd)": lambda: gx.with_restarts(gx.sgd(0.1, momentum=0.9)),
    "monitor_norm": lambda: gx.monitor_norm(),
    "random_clip_by_global_norm": lambda: gx.random_clip_by_global_norm(1.0, beta=0.5),
}
# Stateless transforms build their init in gradxform/base.py (``stateless``, ``identity``, ``chain``),
# which checks the params' root too.
STATELESS = {
    "sgd": lambda: gx.sgd(0.1),
    "clip_by_global_norm": lambda: gx.clip_by_global_norm(1.0),
    "identity": lambda: gx.identity(),
}


def _cases():
    for name, make in STATEFUL.items():
        yield pytest.param(make, id=name)
    for name, make in STATELESS.items():
        yield pytest.param(make, id=name)


@pytest.mark.parametrize("make", list(_cases()))
@pytest.mark.parametrize("given", ["model.parameters()", "model"])
def test_init_with_a_generator_or_module_names_the_fix(make, given):
    model = _model()
    arg = model.parameters() if given == "model.parameters()" else model
    tx = make()
    try:
        tx.init(arg)
    except TypeError as e:
        assert HINT in str(e), str(e)
        return
    raise AssertionError(f"{given} was accepted by init")


@pytest.mark.parametrize("make", [pytest.param(m, id=n) for n, m in STATEFUL.items()])
def test_init_with_named_parameters_still_works(make):
    model = _model()
    params = dict(model.named_parameters())
    state = make().init(params)
    assert state is not None
    as_list = make().init(list(model.parameters()))
    assert as_list is not None


def test_the_error_names_what_was_given():
    model = _model()
    with pytest.raises(TypeError, match=r"generator .*e\.g\. dict\(model\.named_parameters\(\)\)"):
        gx.adam(1e-3).init(model.parameters())
    with pytest.raises(TypeError, match=r"nn\.Module \(Sequential\)"):
        gx.adam(1e-3).init(model)


def test_tree_helpers_refuse_iterators():
    model = _model()
    with pytest.raises(TypeError, match="named_parameters"):
        gx.tree.tree_zeros_like(model.parameters())
    with pytest.raises(TypeError, match="named_parameters"):
        gx.tree.tree_zeros_like({"m": model})
    with pytest.raises(TypeError, match="named_parameters"):
        gx.tree.tree_flatten(iter([torch.ones(1)]))
    zeros = gx.tree.tree_zeros_like({"a": torch.ones(2), "b": None})
    assert torch.equal(zeros["a"], torch.zeros(2)) and zeros["b"] is None


def test_no_future_annotations_in_public_namespace():
    assert not hasattr(gx, "annotations")
    public = {n for n in dir(gx) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(gx, n)).__name__ == "module"}
    assert public - modules <= set(gx.__all__), sorted(public - modules - set(gx.__all__))
