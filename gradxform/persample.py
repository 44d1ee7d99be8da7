"""Per-example gradient statistics: the gradient and ``sum_grad_squared`` in one backward pass.

TrueGrad-style optimisers (`gradxform.moments`) need, per parameter tensor, the sum over the
examples of a batch of the squared per-example gradients. With a mean-reduced loss
``L = (1/N) sum_n l_n`` the convention (BackPACK's ``SumGradSquared``: Dangel, Kunstner and Hennig,
"BackPACK: Packing more into backprop", ICLR 2020, arXiv:1912.10985, section 2) is

    S = sum_n (grad l_n / N)^2            (with reduction="sum": S = sum_n (grad l_n)^2),

i.e. the sum of the squares of each example's *contribution* to the gradient of the loss as
given. The obvious route, ``vmap(grad(...))``, materialises batch x params; this module gets
``S`` from the quantities one ordinary backward already computes.

How. While ``loss_fn`` runs, a `torch.overrides.TorchFunctionMode` watches every torch call
that receives one of the params. A param used exactly once, by a layer whose per-example
gradient has a closed form, takes the **fast path**: a hook on that layer's output receives the
output gradient during the backward pass and turns it, with the saved layer input, into the
layer's contribution to ``S`` (and optionally to the per-example gradient norms) without ever
holding per-example gradients of more than one chunk of examples. Covered layers: ``linear``
(any number of leading dims; per-example gradients are sums over positions, so the
elementwise-square shortcut is used only without extra dims), ``conv1d/2d/3d`` (any stride,
padding, dilation, groups), ``embedding``, ``layer_norm``, ``group_norm``, ``batch_norm`` in
eval mode, and plain elementwise ``+`` / ``*`` with a param (biases, layer scales).

Every other param (used by any other op, used twice, tied weights, a layer whose input does not
carry the batch in dim 0) takes the **exact fallback**: ``vmap(grad)`` over the examples,
restricted to those params and run in chunks whose per-example gradients stay under
``chunk_bytes``. Where vmap cannot batch the model (kernels without a batching rule, e.g.
``nn.GRU``, ``nn.LSTM``, ``nn.RNN``, a ``GRUCell`` loop whose zero state does not come from the
input), the fallback loops over the examples instead: one forward and ``torch.autograd.grad``
per example, still exact. The result's ``methods`` says which path each param
took and why (``"...; exact per-example loop (vmap cannot batch this model: <error>)"`` for the
loop), so the engine never returns a wrong number silently.

The per-example conv rule (im2col + a batched matmul, or ``vmap`` of the layer's own weight
vjp; both exact, rounding differently) is a fixed function of the layer's shape and the device,
so equal inputs give bit-identical results in every call and process (on one machine, torch
build and thread count): the vjp for ``conv3d``,
grouped or string-padded convs (the only rule they have) and, on the CPU, for 2-d kernels of at
least 9 taps (3x3) with at least 8 input channels, at most 32 output channels and at least 64
output positions per example; im2col otherwise (on other devices always, where it applies).

Assumption shared by both paths (as for BackPACK, truegrad and ``vmap``): dim 0 of every batch
tensor indexes examples, and example ``n``'s loss depends on example ``n`` only (no BatchNorm in
training mode; that case raises).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _dist
from . import tree as _tree

__all__ = [
    "PerExampleStats",
    "PerParam",
    "all_reduce_sum_grad_squared",
    "grad_and_sum_grad_squared",
    "sum_grad_squared",
    "track_sum_grad_squared",
]

log = logging.getLogger(__name__)

_MIN_CHUNK_BYTES = 8 << 20


def _default_budget(params: Sequence[torch.Tensor]) -> int:
    """Per-example gradients held at once by default: twice the params' size, at least 8 MiB."""
    return max(_MIN_CHUNK_BYTES, 2 * sum(p.numel() * p.element_size() for p in params))


class PerParam(Mapping[torch.Tensor, Any]):
    """A mapping from parameter tensors (by identity) to values, e.g. ``sum_grad_squared`` of an
    `nn.Module`'s parameters. `gradxform.Optimizer.step` turns it into the per-group lists its
    transforms expect; params without an entry get ``None``.

    Args:
        items: ``(param, value)`` pairs; keys are compared by identity (``id``), not by value.

    Raises:
        KeyError: (on lookup) a param without an entry.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> pp = gx.PerParam([(model.weight, torch.ones(2, 4))])
        >>> len(pp), model.weight in pp, model.bias in pp
        (1, True, False)
    """

    def __init__(self, items: Sequence[tuple[torch.Tensor, Any]] = ()) -> None:
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, Any] = {}
        for k, v in items:
            self._keys[id(k)] = k
            self._values[id(k)] = v

    def __getitem__(self, key: torch.Tensor) -> Any:
        try:
            return self._values[id(key)]
        except KeyError:
            raise KeyError("no entry for this parameter") from None

    def get(self, key: torch.Tensor, default: Any = None) -> Any:  # type: ignore[override]
        return self._values.get(id(key), default)

    def __contains__(self, key: object) -> bool:
        return id(key) in self._values

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PerParam({len(self)} params)"


class PerExampleStats(NamedTuple):
    """What `grad_and_sum_grad_squared` returns.

    ``loss``: the loss (detached); ``grads``: its gradient, shaped like params (zeros for unused
    params); ``sum_grad_squared``: shaped like params; ``per_example_norms``: ``(N,)`` norms of each
    example's contribution to the gradient over all params, or ``None`` when not asked for;
    ``aux``: ``loss_fn``'s auxiliary output with ``has_aux=True``; ``methods``: pytree path ->
    ``"fast:<op>"``, ``"fallback: <reason>"`` or ``"unused"``.
    """

    loss: torch.Tensor
    grads: Any
    sum_grad_squared: Any
    per_example_norms: torch.Tensor | None
    aux: Any
    methods: dict[str, str]


# --- per-example contributions of the covered layers ------------------------------------------


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` of shape ``(N, *rest)`` down to ``(N, *shape)`` (``shape`` broadcast into rest)."""
    extra = t.dim() - 1 - len(shape)
    if extra > 0:
        t = t.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(1 + i for i, s in enumerate(shape) if s == 1 and t.shape[1 + i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t


def _chunks(n: int, per_example_bytes: int, budget: int) -> Iterator[slice]:
    c = max(1, min(n, budget // max(1, per_example_bytes)))
    for s in range(0, n, c):
        yield slice(s, min(n, s + c))


class _Rule(NamedTuple):
    name: str
    slots: tuple[str, ...]  # the argument slots params may occupy
    parse: Callable[..., dict[str, Any]]


def _bind(names: Sequence[str], defaults: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    def parse(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = dict(defaults)
        out.update(zip(names, args))
        out.update(kwargs)
        return out
    return parse


_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_RULES: dict[Any, _Rule] = {
    F.linear: _Rule("linear", ("weight", "bias"), _bind(("input", "weight", "bias"), {"bias": None})),
    F.embedding: _Rule("embedding", ("weight",), _bind(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False})),
    F.layer_norm: _Rule("layer_norm", ("weight", "bias"), _bind(
        ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})),
    F.group_norm: _Rule("group_norm", ("weight", "bias"), _bind(
        ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})),
    F.batch_norm: _Rule("batch_norm", ("weight", "bias"), _bind(
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "eps": 1e-5})),
}
for _f, _d in _CONV.items():
    _RULES[_f] = _Rule(f"conv{_d}d", ("weight", "bias"), _bind(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}))
_ELEMENTWISE: dict[Any, str] = {}
for _name in ("add", "mul"):
    for _f in (getattr(torch, _name), getattr(torch.Tensor, _name), getattr(torch.Tensor, f"__{_name}__"),
               getattr(torch.Tensor, f"__r{_name}__")):
        _ELEMENTWISE[_f] = _name
_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "static_k": None, "static_v": None, "is_causal": False}
_BN_TRAINING = "batch_norm in training mode mixes the examples of a batch: per-example gradients are undefined (use eval mode, GroupNorm or LayerNorm)"


class _Contribution:
    """Accumulates one param's ``S`` and the per-example squared norms."""

    __slots__ = ("sgs", "fired")

    def __init__(self) -> None:
        self.sgs: torch.Tensor | None = None
        self.fired = False


class _Tracker(TorchFunctionMode):
    """Watches torch calls that receive a tracked param; installs backward hooks for the fast path."""

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], batch_size: int | None,
                 norms: bool, chunk_bytes: int, verdict: "_Verdict | None" = None) -> None:
        super().__init__()
        self.verdict = verdict
        self.denied: set[int] = set()  # sent to the fallback by the verdict; a later, specific reason wins
        self.index = {id(p): i for i, p in enumerate(params)}
        self.dtypes = [p.dtype for p in params]
        self.names = list(names)
        self.batch_size = batch_size
        self.uses = [0] * len(params)
        self.method: list[str | None] = [None] * len(params)
        self.contrib = [_Contribution() for _ in params]
        self.want_norms = norms
        self.norms_sq: torch.Tensor | None = None
        self.chunk_bytes = chunk_bytes
        self.quiet = False
        self.hooks_fired = 0
        self.error: str | None = None

    # -- the interception -----------------------------------------------------------------------

    def _hits(self, args: Any, kwargs: dict[str, Any]) -> list[int]:
        hits = []
        stack = [args, list(kwargs.values())]
        while stack:
            obj = stack.pop()
            if isinstance(obj, torch.Tensor):
                i = self.index.get(id(obj))
                if i is not None:
                    hits.append(i)
            elif isinstance(obj, (list, tuple)):
                stack.extend(obj)
        return hits

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.quiet:
            return func(*args, **kwargs)
        hits = self._hits(args, kwargs)
        if hits and func is F.multi_head_attention_forward:
            rewritten = self._attention(args, kwargs)
            if rewritten is not None:
                return rewritten
        out = func(*args, **kwargs)
        if not hits:
            return out
        outs = [t for t in (out if isinstance(out, (list, tuple)) else (out,)) if isinstance(t, torch.Tensor)]
        if not any(t.requires_grad for t in outs):
            return out  # metadata, detach(), shape queries: not a differentiable use
        for i in hits:
            self.uses[i] += 1
        name = getattr(func, "__name__", repr(func))
        if len(set(hits)) != len(hits):
            self._fallback(hits, f"passed twice to {name}")
            return out
        try:
            installed = self._install(func, args, kwargs, out, hits)
        except _Unsupported as e:
            self._fallback(hits, str(e))
            return out
        if not installed:
            self._fallback(hits, f"used by {name}, which has no fast rule")
        return out

    def _attention(self, args: Any, kwargs: dict[str, Any]) -> Any:
        """Self-attention without masks, as ``linear -> scaled_dot_product_attention -> linear``
        with the batch in dim 0, so its projections take the linear fast path (the same math as
        ``F.multi_head_attention_forward``). ``None`` when the call is outside that case."""
        a = _bind(_MHA_ARGS, _MHA_DEFAULTS)(*args, **kwargs)
        q = a["query"]
        if not (q is a["key"] is a["value"] and isinstance(q, torch.Tensor) and q.dim() == 3
                and a["in_proj_weight"] is not None and a["bias_k"] is None and a["bias_v"] is None
                and not a["add_zero_attn"] and not a["need_weights"] and a["attn_mask"] is None
                and a["key_padding_mask"] is None and not a["is_causal"] and not a["use_separate_proj_weight"]
                and a["static_k"] is None and a["static_v"] is None
                and not (a["training"] and a["dropout_p"] > 0)):
            return None
        length, n, e = q.shape
        h = a["num_heads"]
        with self:
            x = q.transpose(0, 1)
            qkv = F.linear(x, a["in_proj_weight"], a["in_proj_bias"]).view(n, length, 3, h, e // h)
            qh, kh, vh = (t.transpose(1, 2) for t in qkv.unbind(2))
            o = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(n, length, e)
            out = F.linear(o, a["out_proj_weight"], a["out_proj_bias"]).transpose(0, 1)
        return out, None

    def _fallback(self, hits: list[int], reason: str) -> None:
        for i in hits:
            if self.method[i] is None or self.method[i].startswith("fast") or i in self.denied:
                self.method[i] = f"fallback: {reason}"
                self.denied.discard(i)

    def _mark(self, hits: list[int], op: str) -> set[int]:
        """Decide each hit's path for this call; returns the hits whose hook must be installed
        (every param marked fast here, even when another param of the same call, e.g. a tied
        weight next to its own bias, takes the fallback)."""
        fast = set()
        for i in hits:
            if self.uses[i] > 1:
                self._fallback([i], "used more than once (e.g. tied weights)")
            elif self.method[i] is None:
                v = self.verdict
                if v is not None and self.names[i] not in v.allowed:
                    self.method[i] = f"fallback: {v.why_not.get(self.names[i], _NOT_VERIFIED)}"
                    self.denied.add(i)
                else:
                    self.method[i] = f"fast:{op}"
                    fast.add(i)
        return fast

    def _check_batch(self, x: Any, op: str) -> int:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise _Unsupported(f"{op} input has no batch dimension")
        n = x.shape[0]
        if self.batch_size is None:
            self.batch_size = n
        elif n != self.batch_size:
            raise _Unsupported(f"{op} input has {n} rows in dim 0, not the batch size {self.batch_size}")
        return n

    def _install(self, func: Any, args: Any, kwargs: dict[str, Any], out: Any, hits: list[int]) -> bool:
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return False
        rule = _RULES.get(func)
        if rule is not None:
            a = rule.parse(*args, **kwargs)
            slot_of = {}
            for slot in rule.slots:
                t = a.get(slot)
                if isinstance(t, torch.Tensor) and id(t) in self.index:
                    slot_of[self.index[id(t)]] = slot
            if set(hits) != set(slot_of):
                raise _Unsupported(f"a param is passed to {rule.name} as something other than {'/'.join(rule.slots)}")
            if rule.name == "batch_norm" and (a.get("training") or a.get("running_mean") is None):
                self.error = _BN_TRAINING
                raise _Unsupported(_BN_TRAINING)
            if rule.name == "embedding" and (a.get("max_norm") is not None or a.get("scale_grad_by_freq")):
                raise _Unsupported("embedding with max_norm or scale_grad_by_freq")
            x = a["input"]
            self._check_batch(x, rule.name)
            if rule.name == "linear" and x.dim() < 2:
                raise _Unsupported("linear on an unbatched input")
            if rule.name.startswith("conv") and x.dim() != int(rule.name[4]) + 2:
                raise _Unsupported(f"{rule.name} on an unbatched input")
            fast = self._mark(hits, rule.name)
            targets = {slot: i for i, slot in slot_of.items() if i in fast}
            if targets:
                out.register_hook(self._hook(rule.name, a, targets))
            return True
        op = _ELEMENTWISE.get(func)
        if op is not None and len(hits) == 1 and len(args) >= 2 and not kwargs:
            i = hits[0]
            p = self._param_arg(args[:2], i)
            other = args[1] if p is args[0] else args[0]
            if not isinstance(other, torch.Tensor) or other.dim() <= p.dim() or out.shape != other.shape:
                raise _Unsupported(f"{op} of a param with a tensor that does not carry the batch")
            self._check_batch(other, op)
            if not self._mark(hits, op):
                return True  # the one param took the fallback
            out.register_hook(self._hook(op, {"other": other if op == "mul" else None, "shape": p.shape},
                                         {"param": i}))
            return True
        return False

    def _param_arg(self, args: Any, i: int) -> torch.Tensor:
        for a in args:
            if isinstance(a, torch.Tensor) and self.index.get(id(a)) == i:
                return a
        raise _Unsupported("param not among the operands")

    # -- backward-time computation --------------------------------------------------------------

    def _hook(self, op: str, a: dict[str, Any], targets: dict[str, int]) -> Callable[[torch.Tensor], None]:
        def hook(go: torch.Tensor) -> None:
            prev, self.quiet = self.quiet, True
            try:
                # Under autocast the layer ran in low precision; the statistic is computed in the
                # param's dtype, from the saved (full-precision) input.
                dt = self.dtypes[next(iter(targets.values()))]
                args = {k: v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dt else v
                        for k, v in a.items()}
                with torch.no_grad(), torch.autocast(go.device.type, enabled=False):
                    parts = _contributions(op, args, go.to(dt), set(targets), self.want_norms, self.chunk_bytes)
                for slot, (sgs, nsq) in parts.items():
                    self._add(targets[slot], sgs, nsq)
            except Exception as e:  # never a wrong number: the exact fallback takes over
                log.warning("fast %s rule failed (%s); those params take the exact fallback", op, e)
                self._fallback(list(targets.values()), f"fast {op} rule failed: {e}")
            finally:
                self.hooks_fired += 1
                self.quiet = prev
        return hook

    def _add(self, i: int, sgs: torch.Tensor, nsq: torch.Tensor | None) -> None:
        if not (self.method[i] or "").startswith("fast"):
            return  # a later use sent it to the fallback: this partial contribution is void
        c = self.contrib[i]
        c.sgs = sgs if c.sgs is None else c.sgs + sgs
        c.fired = True
        if nsq is not None:
            nsq = nsq.to(torch.float64)
            self.norms_sq = nsq if self.norms_sq is None else self.norms_sq + nsq


class _Unsupported(Exception):
    pass


def _square_stats(per_ex: torch.Tensor, norms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    sq = per_ex.square()
    return sq.sum(0), (sq.flatten(1).sum(1) if norms else None)


def _chunked(n: int, per_example_numel: int, elem: int, budget: int,
             make: Callable[[slice], torch.Tensor], norms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``S`` and norms from per-example contributions built chunk by chunk (``make(sl)``, a fresh
    tensor each time, squared in place)."""
    sgs, parts = None, []
    for sl in _chunks(n, per_example_numel * elem, budget):
        sq = make(sl).square_()
        s = sq.sum(0)
        sgs = s if sgs is None else sgs.add_(s)
        if norms:
            parts.append(sq.flatten(1).sum(1))
    return sgs, (torch.cat(parts) if norms else None)  # type: ignore[return-value]


def _pair(v: Any, d: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * d


def _conv_rule(d: int, in_channels: int, out_channels: int, kernel: int, positions: int, groups: int,
               padding: Any, device: torch.device) -> str:
    """Which exact per-example weight-gradient rule a conv layer uses: a pure function of the
    layer's shape and the device, so the same inputs always give the same bits.

    ``"unfold"`` (im2col + one batched matmul) needs ``d <= 2``, ``groups == 1`` and numeric
    padding; otherwise ``"vjp"`` (``vmap`` of the layer's own weight vjp, a grouped convolution).
    Where both apply: off the CPU, ``"unfold"`` (cuBLAS's batched matmul rather than cuDNN's
    backward-weight algorithms, which ``cudnn.benchmark`` picks by timing and some of which are
    non-deterministic). On the CPU, ``"vjp"`` for a 2-d conv whose kernel has at least 9 taps
    (``kernel``, e.g. 3x3) with ``in_channels >= 8``, ``out_channels <= 32`` and at least 64 output
    positions, else ``"unfold"``: the im2col columns (``in_channels * kernel * positions`` per
    example, ``kernel`` times the input) cost more than the matmul, whose output dim is
    ``out_channels``, saves when that dim is small, while the grouped convolution is slow for few
    input channels, few positions, 1x1 and 1-d kernels (measured on 25 shapes with torch 2.13's CPU
    kernels, one thread; on the one shape where the rule picks the slower, the two are within 1.1x).
    """
    if not (d <= 2 and groups == 1 and not isinstance(padding, str)):
        return "vjp"
    if device.type != "cpu":
        return "unfold"
    if d == 2 and kernel >= 9 and in_channels >= 8 and out_channels <= 32 and positions >= 64:
        return "vjp"
    return "unfold"


def _conv_weight_per_example(a: dict[str, Any], go: torch.Tensor, d: int, budget: int,
                             norms: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, w = a["input"], a["weight"]
    n = x.shape[0]
    stride, dil, groups, pad = _pair(a["stride"], d), _pair(a["dilation"], d), a["groups"], a["padding"]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]

    def one(xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        _, vjp = torch.func.vjp(lambda ww: conv(xi[None], ww, None, a["stride"], pad, a["dilation"], groups), w)
        return vjp(gi[None])[0]

    def by_vjp(sl: slice) -> torch.Tensor:
        return torch.func.vmap(one)(x[sl], go[sl])

    per_example = w.numel()
    if _conv_rule(d, x.shape[1], w.shape[0], w[0, 0].numel(), go[0, 0].numel(), groups, pad, x.device) == "vjp":
        return _chunked(n, per_example, x.element_size(), budget, by_vjp, norms)
    # im2col: per-example weight gradient = go_n @ unfold(x_n)^T, one bmm per chunk
    pad2, k = _pair(pad, d), w.shape[2:]
    if d == 1:
        x4, g4 = x.unsqueeze(2), go.unsqueeze(2)
        k2, s2, p2, d2 = (1, k[0]), (1, stride[0]), (0, pad2[0]), (1, dil[0])
    else:
        x4, g4, k2, s2, p2, d2 = x, go, tuple(k), stride, pad2, dil

    def by_unfold(sl: slice) -> torch.Tensor:
        cols = F.unfold(x4[sl], k2, dilation=d2, padding=p2, stride=s2)  # (c, C*k, L)
        return torch.bmm(g4[sl].flatten(2), cols.transpose(1, 2)).reshape((-1,) + tuple(w.shape))

    per_example_unfold = per_example + w[0].numel() * go[0, 0].numel()  # G_n and the columns
    return _chunked(n, per_example_unfold, x.element_size(), budget, by_unfold, norms)


def _contributions(op: str, a: dict[str, Any], go: torch.Tensor, slots: set[str], norms: bool,
                   budget: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{slot: (S, per-example squared norms or None)}`` of one layer call, from its output grad."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    n = go.shape[0]
    if op == "linear":
        x, w = a["input"], a["weight"]
        if x.dim() == 2:
            g2, x2 = go.square(), x.square()
            if "weight" in slots:
                out["weight"] = (g2.t() @ x2, (g2.sum(1) * x2.sum(1)) if norms else None)
            if "bias" in slots:
                out["bias"] = (g2.sum(0), g2.sum(1) if norms else None)
            return out
        x3, g3 = x.reshape(n, -1, x.shape[-1]), go.reshape(n, -1, go.shape[-1])
        if "weight" in slots:
            out["weight"] = _chunked(n, w.numel(), x.element_size(), budget,
                                     lambda sl: torch.bmm(g3[sl].transpose(1, 2), x3[sl]), norms)
        if "bias" in slots:
            out["bias"] = _square_stats(g3.sum(1), norms)
        return out
    if op.startswith("conv"):
        d = int(op[4])
        if "weight" in slots:
            out["weight"] = _conv_weight_per_example(a, go, d, budget, norms)
        if "bias" in slots:
            out["bias"] = _square_stats(go.flatten(2).sum(2), norms)
        return out
    if op == "embedding":
        idx, w = a["input"], a["weight"]
        vocab, dim = w.shape
        rows = idx.reshape(n, -1)
        ex = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(rows)
        keys = (ex * vocab + rows).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        sums = go.new_zeros((uniq.numel(), dim)).index_add_(0, inv, go.reshape(-1, dim))
        which = uniq % vocab
        if a.get("padding_idx") is not None:
            pad = a["padding_idx"] % vocab
            sums = sums * (which != pad).unsqueeze(1).to(sums.dtype)
        sq = sums.square()
        sgs = w.new_zeros(w.shape).index_add_(0, which, sq)
        nsq = go.new_zeros(n).index_add_(0, uniq // vocab, sq.sum(1)) if norms else None
        out["weight"] = (sgs, nsq)
        return out
    if op in ("layer_norm", "group_norm", "batch_norm"):
        x = a["input"]
        if op == "layer_norm":
            shape = torch.Size(a["normalized_shape"] if isinstance(a["normalized_shape"], (list, tuple, torch.Size))
                               else (a["normalized_shape"],))
            xhat = F.layer_norm(x, shape, None, None, a["eps"])

            def reduce(t: torch.Tensor) -> torch.Tensor:
                return _sum_to(t, shape)
        else:
            c = x.shape[1]
            if op == "group_norm":
                xhat = F.group_norm(x, a["num_groups"], None, None, a["eps"])
            else:
                view = (1, c) + (1,) * (x.dim() - 2)
                xhat = (x - a["running_mean"].reshape(view)) * torch.rsqrt(a["running_var"].reshape(view) + a["eps"])

            def reduce(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(n, c, -1).sum(2)
        if "weight" in slots:
            out["weight"] = _square_stats(reduce(go * xhat), norms)
        if "bias" in slots:
            out["bias"] = _square_stats(reduce(go), norms)
        return out
    if op in ("add", "mul"):
        t = go if op == "add" else go * a["other"]
        out["param"] = _square_stats(_sum_to(t, a["shape"]), norms)
        return out
    raise AssertionError(op)  # pragma: no cover


# --- the engine ---------------------------------------------------------------------------------


def _check_engine_args(reduction: str, chunk_bytes: int | None, randomness: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (how loss_fn reduces over the batch); got {reduction!r}")
    if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool)
                                    or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes must be None or a positive int; got {chunk_bytes!r}")
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"randomness must be 'error', 'different' or 'same' (see torch.func.vmap); got {randomness!r}")


def _batch_size(batch: Any) -> int:
    leaves, _ = torch.utils._pytree.tree_flatten(batch)
    sizes = []
    for j, t in enumerate(leaves):
        if isinstance(t, torch.Tensor):
            if t.dim() == 0:
                raise ValueError(f"batch leaf {j} is a 0-d tensor: every batch tensor needs a leading example "
                                 "dimension (pass per-call constants through *args instead)")
            sizes.append((j, t.shape[0]))
    if not sizes:
        raise ValueError("the batch holds no tensor: per-example statistics need a batch whose tensors have a "
                         "leading example dimension")
    n = sizes[0][1]
    bad = [(j, m) for j, m in sizes if m != n]
    if bad:
        raise ValueError(f"batch tensors disagree on the number of examples (dim 0): leaf 0 has {n}, "
                         + ", ".join(f"leaf {j} has {m}" for j, m in bad))
    if n == 0:
        raise ValueError("the batch is empty (0 examples)")
    return n


def _split_result(res: Any, has_aux: bool, reduction: str) -> tuple[torch.Tensor, Any]:
    if has_aux:
        if not (isinstance(res, tuple) and len(res) == 2):
            raise TypeError("has_aux=True: loss_fn must return a (loss, aux) pair")
        loss, aux = res
    else:
        loss, aux = res, None
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor loss; got {type(loss).__name__}"
                        + ("" if has_aux else " (pass has_aux=True if it returns (loss, aux))"))
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss reduced over the batch (reduction={reduction!r}); got "
                         f"shape {tuple(loss.shape)}: reduce the per-example losses with .{reduction}()")
    return loss.reshape(()), aux


def _is_randomness_error(e: BaseException) -> bool:
    """vmap's refusal of a random op under ``randomness="error"``: the user's choice, not a gap."""
    return isinstance(e, RuntimeError) and "randomness" in str(e)


def _fallback(loss_fn: Callable[..., Any], spec: Any, leaves: list[Any], live: list[int], work: list[torch.Tensor],
              fb: list[int], batch: Any, args: tuple, kwargs: dict[str, Any], reduction: str, has_aux: bool,
              n: int, chunk_bytes: int, randomness: str, norms: bool, memo: dict[str, str]
              ) -> tuple[list[torch.Tensor], torch.Tensor | None, str | None]:
    """Exact ``S`` (and squared norms) for the params in ``fb``, chunk by chunk: ``vmap(grad)``
    over the examples of a chunk, or, when vmap cannot batch the model (a kernel without a batching
    rule, e.g. the recurrent ones), a loop of one ``torch.autograd.grad`` per example. The third
    result is why the loop ran (``None`` when vmap did it all); ``memo["loop"]`` keeps that reason
    so later calls of the same engine skip the failing vmap attempt."""
    consts = [w.detach() for w in work]

    def per_example(fb_vals: list[torch.Tensor], example: Any) -> torch.Tensor:
        full = _tree.scatter(leaves, live, _tree.scatter(consts, fb, fb_vals))
        one = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        loss, _ = _split_result(loss_fn(_tree.tree_unflatten(spec, full), one, *args, **kwargs), has_aux, reduction)
        return loss

    in_dims = torch.utils._pytree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, batch)
    per_ex_grad = torch.func.vmap(torch.func.grad(per_example), in_dims=(None, in_dims), randomness=randomness)
    fb_vals = [consts[k] for k in fb]

    cuda = sorted({v.device.index or 0 for v in fb_vals if v.device.type == "cuda"})

    def rng_state() -> list[torch.Tensor]:
        return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in cuda]

    def set_rng_state(states: list[torch.Tensor]) -> None:
        torch.set_rng_state(states[0])
        for d, st in zip(cuda, states[1:]):
            torch.cuda.set_rng_state(st, d)

    same_start: list[torch.Tensor] = []

    def by_loop(chunk: Any, m: int) -> list[torch.Tensor]:
        # vmap's randomness modes, one example at a time: "different" lets each example draw its
        # own numbers, "same" replays the same generator state for every example, and "error"
        # refuses a model that draws any.
        out = [v.new_zeros((m,) + tuple(v.shape)) for v in fb_vals]
        for i in range(m):
            example = torch.utils._pytree.tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, chunk)
            vals = [v.detach().requires_grad_(True) for v in fb_vals]
            if randomness == "same":
                if not same_start:
                    same_start.extend(rng_state())
                set_rng_state(same_start)
            before = rng_state() if randomness == "error" else None
            with torch.enable_grad():
                loss = per_example(vals, example)
                gs = torch.autograd.grad(loss, vals, allow_unused=True) if loss.requires_grad else [None] * len(vals)
            if before is not None and any(not torch.equal(a, b) for a, b in zip(before, rng_state())):
                raise RuntimeError("loss_fn draws random numbers (e.g. dropout in training mode) and the exact "
                                   "fallback must loop over the examples (vmap cannot batch this model): pass "
                                   "randomness='different' (or 'same'), as for vmap, or use eval mode")
            for o, g in zip(out, gs):
                if g is not None:
                    o[i] = g
        return out

    scale = 1.0 / n if reduction == "mean" else 1.0
    per_example_bytes = 2 * sum(v.numel() * v.element_size() for v in fb_vals)
    sgs = [torch.zeros_like(v) for v in fb_vals]
    parts = []
    for sl in _chunks(n, per_example_bytes, chunk_bytes):
        chunk = torch.utils._pytree.tree_map(lambda t, sl=sl: t[sl] if isinstance(t, torch.Tensor) else t, batch)
        gs = None
        if "loop" not in memo:
            try:
                with torch.enable_grad():
                    gs = per_ex_grad(fb_vals, chunk)
            except Exception as e:
                if _is_randomness_error(e):
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:160]
                memo["loop"] = f"{type(e).__name__}: {first}"
                log.info("vmap cannot batch this model (%s); exact per-example loop instead", memo["loop"])
        if gs is None:
            gs = by_loop(chunk, sl.stop - sl.start)
        nsq = None
        for j, g in enumerate(gs):
            sq = (g * scale).square()
            sgs[j] += sq.sum(0)
            if norms:
                part = sq.flatten(1).sum(1).to(torch.float64)
                nsq = part if nsq is None else nsq + part
        if norms:
            parts.append(nsq)
    return sgs, (torch.cat(parts) if norms else None), memo.get("loop")


def grad_and_sum_grad_squared(
    loss_fn: Callable[..., Any],
    *,
    reduction: str = "mean",
    has_aux: bool = False,
    per_example_norms: bool = False,
    fast: bool = True,
    check: bool = True,
    chunk_bytes: int | None = None,
    randomness: str = "error",
    sync: bool = False,
) -> Callable[..., PerExampleStats]:
    """Function transform: ``loss_fn(params, batch, *args)`` -> the loss, its gradient and
    ``sum_grad_squared`` (plus, optionally, per-example gradient norms), in one backward pass.

    ``S = sum_n (grad l_n / N)^2`` for ``loss = mean_n l_n`` (``reduction="mean"``) and
    ``S = sum_n (grad l_n)^2`` for ``loss = sum_n l_n``: the sum of the squared per-example
    contributions to the gradient (BackPACK's ``SumGradSquared`` convention, used by TrueGrad).
    ``per_example_norms[n] = ||contribution of example n||_2`` over all params.

    ``params`` is any pytree of tensors (``None`` leaves are frozen); every tensor in ``batch``
    must have the examples in dim 0; ``loss_fn`` typically calls
    ``torch.func.functional_call(model, params, batch)`` on an unmodified module. Params used
    once by a covered layer (see the module docstring) take the fast path; the others take an
    exact, chunked ``vmap(grad)`` over the examples (at most ``chunk_bytes`` of per-example
    gradients at a time, the same bound for the fast rules that materialise them; default twice
    the params' size, at least 8 MiB; ``randomness`` is passed to ``torch.func.vmap``, so dropout in training
    mode needs ``"different"`` there and then differs from the main pass). Where vmap cannot
    batch the model (recurrent kernels have no batching rule), the fallback loops over the
    examples, one ``torch.autograd.grad`` each, with the same ``randomness`` semantics
    (``"error"`` refuses a model that draws random numbers, ``"same"`` replays one generator
    state per example); this engine remembers that for the params structure. ``fast=False``
    sends every param to the fallback (a reference). ``result.methods`` names each param's path.

    ``check=True`` (default): on the first call for a given params structure, the fast rules run
    on a sub-batch of the first two examples (one for a batch of two or less). Only a param that
    takes the fast path there too, and whose fast statistic there equals the exact one, may take
    it later; any other (a layer whose dim 0 does not follow the batch size, e.g. a
    sequence-first layer with as many positions as examples, or a disagreeing statistic) takes
    the fallback from then on, and ``methods`` says why. If the exact half of the check cannot
    run (dropout with ``randomness="error"``), it is skipped with a log message; the batch-size
    half still applies.

    ``sync=True`` (data parallelism without DDP: each rank passes its shard of the batch): the
    loss and the gradients are combined over the ranks of the default process group as one
    process would compute them on the whole batch (for ``"mean"``: weighted by each rank's
    example count), and the statistic through `all_reduce_sum_grad_squared`;
    ``per_example_norms`` stay this rank's. Under DDP, whose backward already averages the
    gradients, use `track_sum_grad_squared` and `all_reduce_sum_grad_squared` instead.

    Eager only: the fast path relies on a torch-function mode and backward hooks.

    Args:
        loss_fn: ``loss_fn(params, batch, *args)`` returning the loss (or ``(loss, aux)`` with
            ``has_aux``).
        reduction: ``"mean"`` or ``"sum"``, how ``loss_fn`` reduces over the examples.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        per_example_norms: also return each example's gradient-contribution norm.
        fast: use the fast rules where they apply (``False``: the exact fallback everywhere).
        check: check the fast rules against the exact statistic on the first call.
        chunk_bytes: the memory bound of the per-example gradients held at a time.
        randomness: ``torch.func.vmap``'s ``randomness`` (``"error"``, ``"different"``, ``"same"``).
        sync: combine loss, gradients and statistic over the ranks (data parallelism without DDP).

    Returns:
        A function ``(params, batch, *args) -> PerExampleStats`` (fields ``loss``, ``grads``,
        ``sum_grad_squared``, ``per_example_norms``, ``aux``, ``methods``).

    Raises:
        ValueError: an unknown ``reduction`` or ``randomness``, a bad ``chunk_bytes``; a batch
            with no tensor or with a 0-d tensor.

    References:
        Dangel, Kunstner and Hennig, "BackPACK: Packing more into Backprop", ICLR 2020,
        arXiv:1912.10985 (the ``SumGradSquared`` convention). docs/second-moments.md.

    Example:
        >>> import torch.nn.functional as F
        >>> from torch.func import functional_call
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> params = {"weight": torch.tensor([[1.0, -1.0]])}
        >>> loss_fn = lambda p, b: F.mse_loss(functional_call(lin, p, (b[0],)), b[1])
        >>> batch = (torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1))
        >>> stats = gx.grad_and_sum_grad_squared(loss_fn)(params, batch)
        >>> stats.grads["weight"], stats.sum_grad_squared["weight"]
        (tensor([[ 1., -4.]]), tensor([[ 1., 16.]]))
    """
    _check_engine_args(reduction, chunk_bytes, randomness)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, batch, *args) -> loss; got {loss_fn!r}")

    # Per params structure, this engine's own memory (nothing process-wide): the first-call
    # check's verdict and whether vmap could batch the model.
    checked: dict[Any, _Verdict | None] = {}
    memos: dict[Any, dict[str, str]] = {}

    def run(params: Any, batch: Any, *args: Any, **kwargs: Any) -> PerExampleStats:
        leaves = _tree.tree_flatten(params)
        key = leaves[1], tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None for t in leaves[0])
        memo = memos.setdefault(key, {})
        verdict = None
        if fast and check:
            if key not in checked:
                checked[key] = _check_fast_rules(compute, params, batch, args, kwargs, memo)
            verdict = checked[key]
        res = compute(params, batch, args, kwargs, fast, verdict, memo)
        return _synced(res, _batch_size(batch), reduction) if sync else res

    def compute(params: Any, batch: Any, args: tuple, kwargs: dict[str, Any], use_fast: bool,
                verdict: _Verdict | None, memo: dict[str, str], exact_part: bool = True) -> PerExampleStats:
        leaves, spec = _tree.tree_flatten(params)
        paths = _tree.tree_paths(params)
        live = [i for i, t in enumerate(leaves) if t is not None]
        for i in live:
            t = leaves[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"params leaf '{paths[i]}' is a {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise TypeError(f"params leaf '{paths[i]}' has dtype {t.dtype}: only floating-point params have gradients")
        n = _batch_size(batch)
        work = [leaves[i].detach().requires_grad_(True) for i in live]
        p_tree = _tree.tree_unflatten(spec, _tree.scatter(leaves, live, work))
        names = [paths[i] for i in live]
        budget = chunk_bytes if chunk_bytes is not None else _default_budget(work)
        tracker = _Tracker(work, names, n, per_example_norms, budget, verdict) if use_fast else None
        with torch.enable_grad():
            if tracker is not None:
                with tracker:
                    res = loss_fn(p_tree, batch, *args, **kwargs)
            else:
                res = loss_fn(p_tree, batch, *args, **kwargs)
            loss, aux = _split_result(res, has_aux, reduction)
            grads: Sequence[torch.Tensor | None]
            if loss.requires_grad and work:
                grads = torch.autograd.grad(loss, work, allow_unused=True)
            else:
                grads = [None] * len(work)
        if tracker is not None and tracker.error:
            raise ValueError(tracker.error)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, work)]
        sgs: list[torch.Tensor | None] = [None] * len(work)
        methods: dict[str, str] = {}
        fb = []
        for k, w in enumerate(work):
            m = "fallback: fast=False" if tracker is None else tracker.method[k]
            if tracker is not None and m is None and tracker.uses[k] == 0:
                m = "unused"
            if m is not None and m.startswith("fast") and not tracker.contrib[k].fired:  # type: ignore[union-attr]
                m = "unused"  # its layer's output did not reach the loss
            if m == "unused":
                sgs[k] = torch.zeros_like(w)
            elif m is not None and m.startswith("fast"):
                sgs[k] = tracker.contrib[k].sgs.to(w.dtype)  # type: ignore[union-attr]
            else:
                m = m or "fallback"
                fb.append(k)
            methods[names[k]] = m
        norms_sq = tracker.norms_sq if tracker is not None else None
        if fb and exact_part:
            log.debug("exact fallback for %d of %d params: %s", len(fb), len(work), [names[k] for k in fb])
            fb_sgs, fb_nsq, looped = _fallback(loss_fn, spec, leaves, live, work, fb, batch, args, kwargs,
                                               reduction, has_aux, n, budget, randomness, per_example_norms, memo)
            for k, s in zip(fb, fb_sgs):
                sgs[k] = s
                if looped is not None:
                    methods[names[k]] += f"; exact per-example loop (vmap cannot batch this model: {looped})"
            if fb_nsq is not None:
                norms_sq = fb_nsq if norms_sq is None else norms_sq + fb_nsq
        norms = None
        if per_example_norms and exact_part:
            dtype = work[0].dtype if work else torch.float32
            norms = (norms_sq.sqrt().to(dtype) if norms_sq is not None
                     else torch.zeros(n, dtype=dtype, device=work[0].device if work else None))

        def rebuild(vals: Sequence[Any]) -> Any:
            return _tree.tree_unflatten(spec, _tree.scatter([None] * len(leaves), live, vals))

        return PerExampleStats(loss.detach(), rebuild(grads), rebuild(sgs), norms, aux, methods)

    return run


def _synced(res: PerExampleStats, n: int, reduction: str) -> PerExampleStats:
    """``res`` of this rank's shard -> the loss, gradients and statistic of the whole batch (one
    all-reduce for the loss and the gradients, one for the statistic)."""
    if _dist.world_size() == 1:
        return res
    leaves, spec = _tree.tree_flatten(res.grads)
    live_idx, live = _tree.live(leaves)
    w = _dist.share_of_examples(n) if reduction == "mean" else torch.ones((), dtype=torch.float64)
    loss, *grads = _dist.all_reduce_sum([x * w.to(x.dtype) for x in [res.loss, *live]])
    sgs = all_reduce_sum_grad_squared(res.sum_grad_squared, n, reduction=reduction)
    return res._replace(loss=loss, grads=_tree.tree_unflatten(spec, _tree.scatter(leaves, live_idx, grads)),
                        sum_grad_squared=sgs)


def all_reduce_sum_grad_squared(sum_grad_squared: Any, batch_size: int, *, reduction: str = "mean",
                                group: Any = None) -> Any:
    """Combine each rank's ``sum_grad_squared`` into the statistic of the global batch.

    With data parallelism each rank holds ``n_r`` of the ``N = sum_r n_r`` examples and computes
    its statistic over them. For ``loss = sum_n l_n`` the global statistic is the sum over ranks,
    ``S = sum_r S_r``. For ``loss = mean_n l_n`` each rank's contributions were divided by its
    ``n_r`` instead of ``N``, so ``S = sum_r (n_r / N)^2 S_r``: with equal shards,
    ``sum_r S_r / R^2`` (averaging the ``S_r``, as DDP does with gradients, would be ``R`` times
    too large). One all-reduce of ``n_r`` and one of all the leaves together; nothing happens
    without an initialised process group of more than one rank.

    Args:
        sum_grad_squared: a pytree of tensors (``None`` leaves pass) or the `PerParam` that
            `track_sum_grad_squared` returns; not modified.
        batch_size: this rank's number of examples ``n_r``.
        reduction: how the loss reduces over the batch, as for `grad_and_sum_grad_squared`.
        group: the process group (default: the world).

    Returns:
        The same structure holding the global statistic (equal on every rank).

    Raises:
        ValueError: ``batch_size`` is not a positive int; ``reduction`` is not ``"mean"`` or
            ``"sum"``.

    References:
        Dangel, Kunstner and Hennig, "BackPACK: Packing more into Backprop", ICLR 2020,
        arXiv:1912.10985 (the ``SumGradSquared`` quantity); torch.distributed.all_reduce
        (https://pytorch.org/docs/stable/distributed.html#torch.distributed.all_reduce).
        docs/second-moments.md.

    Example:
        >>> s = {"w": torch.tensor([4.0, 1.0])}
        >>> gx.all_reduce_sum_grad_squared(s, batch_size=8)["w"]  # one process: unchanged
        tensor([4., 1.])
    """
    _check_engine_args(reduction, None, "error")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be this rank's number of examples (a positive int); got {batch_size!r}")
    if _dist.world_size(group) == 1:
        return sum_grad_squared
    if isinstance(sum_grad_squared, PerParam):
        keys = list(sum_grad_squared)
        values = all_reduce_sum_grad_squared([sum_grad_squared[k] for k in keys], batch_size, reduction=reduction,
                                             group=group)
        return PerParam(list(zip(keys, values)))
    leaves, spec = _tree.tree_flatten(sum_grad_squared)
    live_idx, live = _tree.live(leaves)
    if not live:
        return sum_grad_squared
    if reduction == "mean":
        weight = _dist.share_of_examples(batch_size, live[0].device, group) ** 2
        live = [t * weight.to(device=t.device, dtype=t.dtype) for t in live]
    total = _dist.all_reduce_sum(live, group)
    return _tree.tree_unflatten(spec, _tree.scatter(leaves, live_idx, total))


_CHECK_FAILED = "the fast rule disagreed with the exact per-example gradient on the first call (batch not in dim 0?)"
_NOT_VERIFIED = "the first-call check could not verify its fast rule (batch not in dim 0?)"


class _Verdict(NamedTuple):
    """The first-call check's result: the params whose fast rule was verified on a sub-batch; any
    other param that would take the fast path later takes the fallback, for the reason in
    ``why_not``."""

    allowed: frozenset[str]
    why_not: dict[str, str]


def _check_fast_rules(compute: Callable[..., PerExampleStats], params: Any, batch: Any, args: tuple,
                      kwargs: dict[str, Any], memo: dict[str, str]) -> _Verdict | None:
    """Run the fast rules on a sub-batch of ``k`` examples (2, or 1 for a batch of 2 or less) and
    verify them. A param passes only if (1) its layer takes the fast path there too, i.e. the
    layer's dim 0 follows the batch size from ``N`` down to ``k`` (a layer whose dim 0 is a
    sequence or another dim that equals ``N`` by chance does not), and (2) its fast statistic
    equals the exact per-example one on the sub-batch (skipped, with a log message, when the
    exact path cannot run there, e.g. dropout with ``randomness="error"``). ``None``: the fast
    pass itself could not run on the sub-batch, so nothing could be verified."""
    n = _batch_size(batch)
    k = 2 if n > 2 else 1
    sub = torch.utils._pytree.tree_map(lambda t: t[:k] if isinstance(t, torch.Tensor) else t, batch)
    try:
        fast = compute(params, sub, args, kwargs, True, None, memo, exact_part=False)
    except Exception as e:
        log.info("fast-rule check skipped: %s", e)
        return None
    allowed = {name for name, m in fast.methods.items() if m.startswith("fast")}
    why_not = {name: f"not verified by the first-call check (on a {k}-example sub-batch: {m.removeprefix('fallback: ')}; "
                     "batch not in dim 0?)"
               for name, m in fast.methods.items() if name not in allowed}
    if allowed:
        try:
            exact = compute(params, sub, args, kwargs, False, None, memo)
        except Exception as e:  # e.g. dropout under randomness="error": the batch-dim part stands
            log.info("fast-rule check against the exact statistic skipped: %s", e)
        else:
            f_leaves = dict(zip(_tree.tree_paths(params), _tree.tree_flatten(fast.sum_grad_squared)[0]))
            e_leaves = dict(zip(_tree.tree_paths(params), _tree.tree_flatten(exact.sum_grad_squared)[0]))
            for name in sorted(allowed):
                a, b = f_leaves[name], e_leaves[name]
                tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-7
                if not torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()) + 1e-30):
                    allowed.discard(name)
                    why_not[name] = _CHECK_FAILED
    rejected = sorted(n for n, m in fast.methods.items()
                      if m.startswith("fast") and n not in allowed or "rows in dim 0" in m)
    if rejected:
        log.warning("first-call check: the fast rules of %s were not verified (batch not in dim 0, or a statistic "
                    "unlike the exact one); they take the exact fallback",
                    rejected)
    return _Verdict(frozenset(allowed), why_not)


def sum_grad_squared(loss_fn: Callable[..., Any], params: Any, batch: Any, *args: Any,
                     reduction: str = "mean", **options: Any) -> tuple[Any, Any]:
    """``(grads, sum_grad_squared)`` of ``loss_fn(params, batch, *args)``; shorthand for
    `grad_and_sum_grad_squared` (same options and convention).

    Args:
        loss_fn: ``loss_fn(params, batch, *args)`` returning the loss.
        params: a pytree of tensors (``None`` leaves are frozen).
        batch: the batch, examples in dim 0 of every tensor.
        *args: further arguments of ``loss_fn``.
        reduction: ``"mean"`` or ``"sum"``.
        **options: the options of `grad_and_sum_grad_squared`.

    Returns:
        ``(grads, sum_grad_squared)``, two trees shaped like ``params``.

    Raises:
        ValueError: as `grad_and_sum_grad_squared`.

    References:
        Dangel, Kunstner and Hennig, "BackPACK: Packing more into Backprop", ICLR 2020,
        arXiv:1912.10985 (the ``SumGradSquared`` convention). docs/second-moments.md.

    Example:
        >>> import torch.nn.functional as F
        >>> from torch.func import functional_call
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> params = {"weight": torch.tensor([[1.0, -1.0]])}
        >>> loss_fn = lambda p, b: F.mse_loss(functional_call(lin, p, (b[0],)), b[1])
        >>> batch = (torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1))
        >>> grads, s = gx.sum_grad_squared(loss_fn, params, batch)
        >>> s["weight"]  # per-example contributions (1, 0) and (0, -4)
        tensor([[ 1., 16.]])
    """
    res = grad_and_sum_grad_squared(loss_fn, reduction=reduction, **options)(params, batch, *args)
    return res.grads, res.sum_grad_squared


class track_sum_grad_squared:
    """Fill ``sum_grad_squared`` during an ordinary ``loss.backward()`` on an unmodified module.

    ::

        with gx.track_sum_grad_squared(model) as stats:
            loss = F.cross_entropy(model(x), y)      # a mean over the batch
            loss.backward()
        opt.step(sum_grad_squared=stats.sum_grad_squared)   # a gx.PerParam

    Same convention and fast path as `grad_and_sum_grad_squared`: the statistic is the sum of
    squared per-example contributions to the gradient of the loss that was back-propagated (so
    ``S = sum_n (grad l_n / N)^2`` for a mean). One forward per ``with`` block: a param used twice
    (two forwards, tied weights) or by an op without a fast rule has no exact statistic here,
    because there is no loss function to re-run. ``missing="raise"`` (default) makes reading
    ``sum_grad_squared`` fail with the names and reasons of those params; ``missing="none"``
    leaves them out (``None``), e.g. for a transform with ``fallback="adam"``. Nothing is
    attached to the parameters.

    Args:
        params: an ``nn.Module`` (its parameters that require grad, by name) or an iterable of
            parameter tensors.
        missing: ``"raise"`` or ``"none"``: what reading ``sum_grad_squared`` does for a param
            without an exact statistic.
        per_example_norms: also keep each example's gradient norm.
        chunk_bytes: the memory budget of one chunk of per-example work (``None``: a default
            from the params' size).

    Raises:
        ValueError: an unknown ``missing``, a bad ``chunk_bytes``; (when reading) a param
            without an exact statistic under ``missing="raise"``.
        TypeError: a param is not a tensor.
        RuntimeError: (when reading) no forward and backward ran inside the ``with`` block.

    References:
        Dangel, Kunstner and Hennig, "BackPACK: Packing more into Backprop", ICLR 2020,
        arXiv:1912.10985 (the ``SumGradSquared`` convention); Goodfellow, "Efficient
        Per-Example Gradient Computations", arXiv:1510.01799 (the per-layer rule for linear
        layers). docs/second-moments.md.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> with gx.track_sum_grad_squared(model) as stats:
        ...     loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1] * 4))
        ...     loss.backward()
        >>> stats.methods
        {'weight': 'fast:linear', 'bias': 'fast:linear'}
        >>> opt = gx.Optimizer(model.parameters(), gx.tg_adamw(1e-3))
        >>> opt.step(sum_grad_squared=stats.sum_grad_squared)
    """

    def __init__(self, params: Any, *, missing: str = "raise", per_example_norms: bool = False,
                 chunk_bytes: int | None = None) -> None:
        if missing not in ("raise", "none"):
            raise ValueError(f"missing must be 'raise' or 'none'; got {missing!r}")
        _check_engine_args("mean", chunk_bytes, "error")
        if isinstance(params, torch.nn.Module):
            named = [(k, p) for k, p in params.named_parameters() if p.requires_grad]
        else:
            plist = list(params)
            named = [(str(i), p) for i, p in enumerate(plist)]
        for k, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param '{k}' is a {type(p).__name__}, not a tensor")
        self._names = [k for k, _ in named]
        self._params = [p for _, p in named]
        self._missing = missing
        budget = chunk_bytes if chunk_bytes is not None else _default_budget(self._params)
        self._tracker = _Tracker(self._params, self._names, None, per_example_norms, budget)

    def __enter__(self) -> "track_sum_grad_squared":
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tracker.__exit__(*exc)

    @property
    def methods(self) -> dict[str, str]:
        """name -> ``"fast:<op>"``, ``"unused"`` or ``"missing: <reason>"``."""
        t = self._tracker
        out = {}
        for k, name in enumerate(self._names):
            m = t.method[k]
            if m is None and t.uses[k] == 0 or (m or "").startswith("fast") and not t.contrib[k].fired:
                out[name] = "unused"
            elif m is not None and m.startswith("fast"):
                out[name] = m
            else:
                out[name] = "missing: " + (m or "fallback").removeprefix("fallback: ")
        return out

    def _check_ran(self) -> None:
        if self._tracker.error:
            raise ValueError(self._tracker.error)
        if self._tracker.hooks_fired == 0:
            raise RuntimeError("no statistic yet: run the forward inside the with-block and call backward() "
                               "before reading it")

    @property
    def sum_grad_squared(self) -> PerParam:
        """``{param: S}`` for every param (zeros for unused ones)."""
        self._check_ran()
        methods = self.methods
        missing = [(n, m) for n, m in methods.items() if m.startswith("missing")]
        if missing and self._missing == "raise":
            raise ValueError("no exact sum_grad_squared for " + "; ".join(f"'{n}' ({m[9:]})" for n, m in missing)
                             + ". Use gx.grad_and_sum_grad_squared with a loss function (exact fallback), or "
                             "missing='none' with a transform whose fallback='adam'")
        items = []
        for k, p in enumerate(self._params):
            m = methods[self._names[k]]
            if m == "unused":
                items.append((p, torch.zeros_like(p)))
            elif m.startswith("fast"):
                items.append((p, self._tracker.contrib[k].sgs.to(p.dtype)))  # type: ignore[union-attr]
        return PerParam(items)

    @property
    def per_example_norms(self) -> torch.Tensor:
        """``(N,)`` norms of each example's gradient contribution (needs ``per_example_norms=True``
        and every param on the fast path)."""
        self._check_ran()
        if not self._tracker.want_norms:
            raise RuntimeError("construct with per_example_norms=True to get per-example norms")
        missing = [n for n, m in self.methods.items() if m.startswith("missing")]
        if missing:
            raise ValueError(f"per-example norms are incomplete: no fast rule for {missing}")
        return self._tracker.norms_sq.sqrt()  # type: ignore[union-attr]
