"""The docs cover the public API: every name in ``gradxform.__all__`` has a docstring and is
rendered by an API page (``docs/api/<module>.md`` with ``::: gradxform.<module>``, listed in
mkdocs.yml's nav), and every docs page is reachable from the nav."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import gradxform as gx
from helpers import needs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _nav_pages() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))


def _home_module(name: str) -> str:
    obj = getattr(gx, name)
    mod = getattr(obj, "__module__", None) or ""
    if not mod.startswith("gradxform.") and inspect.ismodule(obj):
        return obj.__name__
    return mod


@pytest.mark.parametrize("name", sorted(gx.__all__))
def test_public_name_is_documented(name):
    obj = getattr(gx, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc.split()) >= 3, f"gx.{name} has no docstring"
    module = _home_module(name)
    assert module.startswith("gradxform."), f"gx.{name} comes from {module!r}"
    short = module.split(".", 1)[1]
    page = DOCS / "api" / f"{short}.md"
    assert page.exists(), f"no API page docs/api/{short}.md for gx.{name}"
    assert f"::: {module}" in page.read_text()
    assert f"api/{short}.md" in _nav_pages(), f"docs/api/{short}.md is not in mkdocs.yml's nav"
    if not inspect.ismodule(obj):
        mod_all = getattr(__import__(module, fromlist=["_"]), "__all__", None)
        assert mod_all is None or name in mod_all, f"{module}.__all__ lacks {name} (mkdocstrings renders __all__)"


def test_every_docs_page_is_in_the_nav():
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    missing = sorted(pages - _nav_pages())
    assert not missing, f"docs pages not reachable from mkdocs.yml's nav: {missing}"


# --- status text stays honest: no public family listed as missing ------------------------------

# Each public technique family: the words a status line would use for it, the docs page that
# documents it, and an entry point that must exist in ``gx``.
FAMILIES = {
    "init-scale solvers": (("init-scale", "gradinit", "empirical init"), "init-scale.md", "gradinit"),
    "loss weighting": (("loss weighting", "loss-weight", "gradnorm"), "loss-weighting.md", "gradnorm"),
    "second moments": (("second moment", "second-moment", "truegrad"), "second-moments.md", "tg_adamw"),
    "clippers": (("clipper", "clipping", "autoclip"), "clipping.md", "autoclip"),
}
_MISSING = re.compile(
    r"not (?:yet )?implemented|to come|coming soon|not yet (?:available|supported|in)|"
    r"planned|work in progress|\bWIP\b|\bTODO\b|missing", re.I)


def _status_texts() -> dict[str, str]:
    pyproject = (ROOT / "pyproject.toml").read_text()
    description = re.search(r'^description\s*=\s*"(.*)"\s*$', pyproject, flags=re.M)
    assert description, "pyproject.toml has no one-line description"
    return {"docs/index.md": (DOCS / "index.md").read_text(), "README.md": (ROOT / "README.md").read_text(),
            "pyproject.toml description": description.group(1)}


def _sentences(text: str) -> list[str]:
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks are not status text
    return [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n\s*[-*|] ", text) if s.strip()]


@pytest.mark.parametrize("where", ["docs/index.md", "README.md", "pyproject.toml description"])
def test_no_public_family_is_listed_as_missing(where):
    text = _status_texts()[where]
    for family, (words, _, _) in FAMILIES.items():
        for sentence in _sentences(text):
            low = sentence.lower()
            if any(w in low for w in words):
                hit = _MISSING.search(sentence)
                assert not hit, (f"{where} lists the {family} family as missing ({hit.group(0)!r}), "
                                 f"but it is public: {' '.join(sentence.split())!r}")


def test_the_missing_pattern_catches_the_old_status_lines():
    # the two lines this test was written against must fail it
    for old in ["The other families (second moments, loss weighting, init-scale solvers) are not "
                "implemented yet.", "heavy-tail gradient clipping (GradInit, GradNorm and TrueGrad to come)."]:
        assert any(_MISSING.search(s) for s in _sentences(old) if "gradnorm" in s.lower()
                   or "second moment" in s.lower())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_public_and_linked_from_the_index(family):
    words, page, entry = FAMILIES[family]
    assert callable(getattr(gx, entry, None)), f"gx.{entry} ({family}) is not public"
    assert (DOCS / page).exists(), f"docs/{page} ({family}) does not exist"
    assert f"]({page})" in (DOCS / "index.md").read_text(), f"docs/index.md does not link {page} ({family})"
    assert page in _nav_pages()


def test_index_links_point_to_pages_that_exist():
    for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", (DOCS / "index.md").read_text()):
        assert (DOCS / target).exists(), f"docs/index.md links {target}, which does not exist"


# --- checkpoints: what the pages say about torch.load(weights_only=True) ----------------------


def _round_trip(obj):
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@needs("weights_only_load")
def test_checkpoints_load_with_weights_only_as_the_docs_say():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = gx.Optimizer(model.parameters(), gx.chain(gx.autoclip(0.1), gx.adamw(1e-3)))
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    loaded = _round_trip(opt.state_dict())
    p0 = next(iter(model.parameters()))
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state[p0]["exp_avg"])

    params = {"w": torch.ones(3), "b": torch.zeros(2)}
    tx = gx.chain(gx.clip_by_global_norm(1.0), gx.adamw(0.1))
    state = tx.init(params)
    _, state = tx.update({"w": torch.full((3,), 2.0), "b": torch.ones(2)}, state, params)
    restored = gx.state_from_dict(tx.init(params), _round_trip(gx.state_to_dict(state)))
    assert torch.equal(restored[1].inner_state[0].nu["w"], state[1].inner_state[0].nu["w"])
    # the raw NamedTuple state loads too, in a process that imported gradxform (docs/checkpoints.md)
    raw = _round_trip(state)
    assert type(raw[1].inner_state[0]) is type(state[1].inner_state[0])
    assert torch.equal(raw[1].inner_state[0].mu["b"], state[1].inner_state[0].mu["b"])


def test_checkpoint_pages_agree_on_weights_only():
    # no page may say that weights_only=True refuses a gradxform state that the test above loads
    for page in ["checkpoints.md", "quickstart.md", "clipping.md"]:
        for sentence in _sentences((DOCS / page).read_text()):
            if "weights_only=True" in sentence and re.search(r"refuse|cannot|fails", sentence):
                assert "not imported gradxform" in " ".join(sentence.split()), (page, sentence)


# --- the project is self-contained: no pointer to internal notes users do not have ------------

# assembled so that this file does not match itself
_INTERNAL = re.compile("|".join(re.escape(s) for s in ("TECHNIQUES" + ".md", "DESIGN" + ".md", "shared/" + "specs")))


def _shipped_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "mkdocs.yml"]
    for folder in ("gradxform", "docs", "examples", "tests", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yml", ".toml", ".txt", ".cfg"}]
    return [p for p in files if p.exists()]


def test_no_reference_to_internal_specs():
    hits = []
    for path in _shipped_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _INTERNAL.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "cite the paper or the docs page instead:\n" + "\n".join(hits)


def test_internal_spec_pattern_matches_what_it_guards():
    for line in ("see TECHNIQUES" + ".md 4.3", "(DESIGN" + ".md)", "../shared/" + "specs/x"):
        assert _INTERNAL.search(line)


# --- the nav groups the technique families apart from the cross-cutting guides ---------------


def _nav_section(title: str) -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    m = re.search(rf"^  - {re.escape(title)}:\s*\n((?:      .*\n|\s*#.*\n)*)", text, flags=re.M)
    assert m, f"mkdocs.yml's nav has no {title!r} section"
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", m.group(1), flags=re.M))


def test_nav_groups_techniques_and_guides():
    techniques = _nav_section("Techniques")
    assert techniques == {"init-scale.md", "loss-weighting.md", "second-moments.md", "clipping.md"}, techniques
    assert {page for _, page, _ in FAMILIES.values()} == techniques
    guides = _nav_section("Guides")
    assert {"three-ways.md", "concepts.md", "checkpoints.md", "torch-func.md"} <= guides, guides
    assert not techniques & guides
    assert re.search(r"^  - Catalog:", (ROOT / "mkdocs.yml").read_text(), flags=re.M)


def test_compile_docs_warn_about_float_learning_rates():
    text = (DOCS / "three-ways.md").read_text()
    section = text[text.index("## 3. `torch.compile`"):]
    assert "A Python float learning rate recompiles" in section
    assert "CompileCounter" in section and "0-d tensor" in section


# --- one docstring format for the public functions --------------------------------------------
#
# The rule (math) first, then ``Args:``, ``Returns:``, ``Raises:`` (when it raises),
# ``References:`` and ``Example:``, in that order. Every alias and family entry point has an
# ``Example:``, and each example runs (``>>>`` lines executed; an output line after an expression
# is compared with its repr; the names an example may use undefined are `_example_scope`'s).
# "Public" is every function in ``gx.__all__`` and in the ``__all__`` of each module that an API
# page renders (``gx.tree.tree_map``, ``gradxform.base.info_of``, ...): no allow-list.

_SECTIONS = ("Args:", "Returns:", "Raises:", "References:", "Example:")

# aliases and family entry points: an Example is required
_NEEDS_EXAMPLE = {
    "sgd", "adam", "adamw", "tg_adamw", "tg_laprop", "tg_rmsprop", "clip_by_global_norm", "clip_by_leaf_norm",
    "clip", "clip_by_block_rms", "adaptive_grad_clip", "autoclip", "random_clip_by_global_norm", "clipped_sgd",
    "clipped_sstm", "with_restarts", "gradnorm", "uncertainty_weighting", "dwa", "gradinit", "empirical_init",
    "grad_and_sum_grad_squared", "sum_grad_squared", "track_sum_grad_squared", "masked", "partition",
    "inject_hyperparams", "apply_if_finite", "multi_steps", "batched", "upcast", "state_to_dict",
    "state_from_dict", "constant_schedule", "linear_schedule", "cosine_decay_schedule",
    "warmup_cosine_decay_schedule", "exponential_decay", "piecewise_constant_schedule", "join_schedules",
}


def _obj(name: str):
    """``gx.<name>``; a dotted name (``"tree.tree_map"``) is a name of module ``gradxform.tree``."""
    if "." not in name:
        return getattr(gx, name)
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"gradxform.{module}"), attr)


def _api_modules() -> list[str]:
    """The modules an API page renders (``docs/api/<module>.md``)."""
    return sorted(p.stem for p in (DOCS / "api").glob("*.md"))


def _public(kind) -> list[str]:
    """The names in ``gx.__all__`` of this kind, and those in the ``__all__`` of every module an API
    page renders (``gx.tree``, ``gradxform.base``, ...) that are not also ``gx`` names (nor
    re-exports such as ``base.Params = typing.Any``)."""
    names = [n for n in gx.__all__ if kind(getattr(gx, n))]
    seen = {id(getattr(gx, n)) for n in gx.__all__}
    for short in _api_modules():
        mod = importlib.import_module(f"gradxform.{short}")
        for n in getattr(mod, "__all__", ()):
            obj = getattr(mod, n)
            if kind(obj) and id(obj) not in seen and (getattr(obj, "__module__", None) or "").startswith("gradxform."):
                seen.add(id(obj))
                names.append(f"{short}.{n}")
    return sorted(names)


def _public_functions() -> list[str]:
    return _public(inspect.isfunction)


def _format_problems(name: str) -> list[str]:
    doc = inspect.getdoc(_obj(name)) or ""
    found = [(m.start(), m.group(1)) for m in re.finditer(r"^(Args:|Returns:|Raises:|References:|Example:)\s*$", doc, re.M)]
    names = [s for _, s in found]
    problems = []
    if not found or found[0][0] == 0 or not doc[:found[0][0]].strip():
        problems.append("no rule before the sections")
    for needed in ("Returns:", "References:"):
        if needed not in names:
            problems.append(f"no {needed}")
    if inspect.signature(_obj(name)).parameters and "Args:" not in names:
        problems.append("no Args:")
    if names != sorted(names, key=_SECTIONS.index) or len(set(names)) != len(names):
        problems.append(f"sections out of order or repeated: {names}")
    if name in _NEEDS_EXAMPLE and "Example:" not in names:
        problems.append("no Example:")
    return problems


@pytest.mark.parametrize("name", _public_functions())
def test_public_function_docstring_format(name):
    problems = _format_problems(name)
    assert not problems, f"gx.{name}'s docstring: {problems}"


def test_needs_example_names_public_functions():
    assert _NEEDS_EXAMPLE <= set(gx.__all__), sorted(_NEEDS_EXAMPLE - set(gx.__all__))


# --- public classes: a lighter check -------------------------------------------------------------
#
# Every public class (in ``gx.__all__`` or in the ``__all__`` of a module an API page renders, as
# for the functions) has its own docstring whose first paragraph states its purpose.
# A NamedTuple (the transform states) names each of its fields (``field``, or ``field:`` in an
# ``Attributes:`` section); another class whose constructor takes arguments has an ``Args:`` (or,
# for a record the library fills, ``Attributes:``) section. Sections that are present come in
# the functions' order.


def _public_classes() -> list[str]:
    return _public(inspect.isclass)


def _class_problems(cls: type) -> list[str]:
    own = cls.__dict__.get("__doc__") or ""
    doc = inspect.cleandoc(own)
    problems = []
    if len(doc.split()) < 3:
        return ["no docstring of its own"]
    if re.match(r"^(Args|Attributes|Returns|Raises|References|Example):", doc):
        problems.append("no summary before the sections")
    fields = getattr(cls, "_fields", None)
    if fields is not None:
        missing = [f for f in fields if not re.search(rf"``{f}``|`{f}`|^\s+{f}:", doc, re.M)]
        if missing:
            problems.append(f"fields not described: {missing}")
    else:
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if params and not re.search(r"^(Args|Attributes):\s*$", doc, re.M):
            problems.append(f"no Args: for {[p.name for p in params]}")
    names = re.findall(r"^(Args:|Returns:|Raises:|References:|Example:)\s*$", doc, re.M)
    if names != sorted(names, key=_SECTIONS.index) or len(set(names)) != len(names):
        problems.append(f"sections out of order or repeated: {names}")
    return problems


@pytest.mark.parametrize("name", _public_classes())
def test_public_class_docstring(name):
    problems = _class_problems(_obj(name))
    assert not problems, f"gx.{name}'s docstring: {problems}"


def test_class_check_catches_the_old_docstrings():
    class Old(tuple):  # a NamedTuple-like with an undescribed field, as GraftState was
        """The states of the two grafted transforms."""
        _fields = ("magnitude_state", "direction_state")

    class NoArgs:
        """Fill sum_grad_squared during a backward."""

        def __init__(self, params, *, missing="raise"):
            pass

    for cls, expected in ((Old, "fields not described"), (NoArgs, "no Args:")):
        assert any(expected in p for p in _class_problems(cls)), cls


def _example(name: str) -> list[tuple[str, str | None]]:
    doc = inspect.getdoc(_obj(name)) or ""
    if "\nExample:" not in doc:
        return []
    body = doc.split("\nExample:", 1)[1]
    steps: list[tuple[str, str | None]] = []
    for line in body.splitlines():
        s = line.strip()
        if s.startswith(">>> "):
            steps.append((s[4:], None))
        elif s.startswith("... ") and steps:
            steps[-1] = (steps[-1][0] + "\n" + s[4:], None)
        elif s and steps and steps[-1][1] is None:
            steps[-1] = (steps[-1][0], s)
    return steps


def _example_scope() -> dict:
    """What an example may use without defining it: ``torch``, ``gx`` and every public name, and
    a small model: ``model`` (``torch.nn.Linear(4, 2)``), ``x`` (a batch of 8 inputs),
    ``params`` and ``grads`` (dicts of its detached parameters and of their gradients on
    ``loss_fn(params, x)``, the mean squared output)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)

    def loss_fn(params, x):
        return torch.func.functional_call(model, params, (x,)).square().mean()

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = torch.func.grad(loss_fn)(params, x)
    return {"torch": torch, "gx": gx, **{n: getattr(gx, n) for n in gx.__all__},
            "model": model, "x": x, "params": params, "grads": grads, "loss_fn": loss_fn}


@pytest.mark.parametrize("name", [n for n in _public_functions() + _public_classes() if _example(n)])
def test_docstring_example_runs(name):
    scope = _example_scope()
    for code, expected in _example(name):
        if expected is None:
            exec(code, scope)
        else:
            got = repr(eval(code, scope))
            assert " ".join(got.split()) == " ".join(expected.split()), f"gx.{name}: {code} gave {got}, not {expected}"


def test_help_adamw_says_update_needs_params():
    doc = inspect.getdoc(gx.adamw)
    assert re.search(r"``update``.{0,40}needs ``params``", doc, re.S), doc[:300]
