"""Fuse the small elementwise ops of Llama-family Hugging Face models with torch.compile.

A decode step of a 7B Llama in CUDA graphs spends ~1.3 of ~7 ms in tiny elementwise kernels:
every RMSNorm is ~8 of them (to float32, pow, mean, add eps, rsqrt, mul, to dtype, mul weight),
rotary embedding ~10 per layer (rotate_half's slices, neg and cat, the muls and adds), and the
MLP's act_fn(gate) * up two more. `fuse_small_ops(model)` replaces just these with compiled
functions (Inductor fuses each into one or two kernels) and leaves everything else, the KV-cache
writes and attention included, to eager PyTorch: compiling the whole forward functionalizes the
cache's index_copy_ writes into copies of the whole cache (see GraphedRunner's `compile`).

What is patched, on module instances (never classes):
  - RMSNorm modules (class name ends in "RMSNorm", `weight` plus `variance_epsilon` or `eps`)
    whose forward is HF's LlamaRMSNorm code (same bytecode; Gemma's `(1 + weight)` norm and other
    variants are left alone) -> one compiled `_rms_norm(x, weight, eps)` shared by all instances:
    the weight is an argument, so Dynamo compiles once per input shape, not once per module.
  - MLPs with gate_proj/up_proj/down_proj and a SiLU act_fn whose forward uses nothing else
    -> down_proj(_silu_mul(gate_proj(x), up_proj(x))).
  - Rotary: attention forwards look `apply_rotary_pos_emb` up as a global of their modeling module
    at call time. That global is replaced (once per module) by a dispatcher around the module's
    OWN function, so the compiled code is that function's math, whatever the model family.

With `matmuls=True` (the default) the linear layers go too, since cuBLAS reaches only ~63-80% of
the copy bandwidth on a decode step's matrix-vector products (scripts/bench_matmul.py):
  - q/k/v projections (bias-free nn.Linear of one input width) share one weight, rows
    concatenated, and so do an MLP's gate/up: one read of a larger matrix instead of three or
    two. The modules' own weights become views into the concatenated one (no extra memory, and
    outside the scope each keeps computing exactly what it did). q_proj computes all three and
    hands k_proj and v_proj their slices, only for the very tensor it was given: called in
    another order or on another input, each falls back to its own product.
  - every bias-free nn.Linear runs `skinny_matmul.linear` (Triton kernels for up to 64 rows,
    or cuBLAS where it timed faster for that shape on this GPU).

All of it is inert outside an `enabled()` scope: a patched forward (and the rotary dispatcher)
then calls the original code unchanged. GraphedRunner(compile="parts") enters the scope only
for its bucket-sized forwards, which have fixed shapes: prefills of arbitrary length stay eager
(with dynamic=False each new length would recompile), and other runners sharing the same model
object (an eager ModelRunner, an uncompiled GraphedRunner) still run the original forwards.

Compilation happens on the first call per shape (GraphedRunner's warm-ups, before capture); the
compiled functions use Inductor's default mode without its CUDA graphs, so the Triton kernels are
captured into the runner's own graphs. Inductor is asked to emulate eager's low-precision
rounding (emulate_precision_casts, where this torch has it), so bf16 results round where eager's do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F

from . import skinny_matmul

log = logging.getLogger(__name__)

_ACTIVE = 0  # depth of enabled() scopes
_ROTARY_NAME = "apply_rotary_pos_emb"
_PATCHED_GLOBALS: list[dict] = []  # module namespaces whose rotary global was replaced
MLP_ATTRS = ("gate_proj", "up_proj", "down_proj", "act_fn")


@contextlib.contextmanager
def enabled():
    """Within this scope patched modules run their compiled ops; outside, the original forwards."""
    global _ACTIVE
    _ACTIVE += 1
    try:
        yield
    finally:
        _ACTIVE -= 1


def is_enabled() -> bool:
    return _ACTIVE > 0


def raise_recompile_limit(limit: int = 256) -> None:
    """Dynamo's default of 8 compiled variants per code object would silently fall back to
    uncompiled code (here: one variant per padded bucket size and model width)."""
    from torch import _dynamo

    cfg = _dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


def _compile(fn):
    opts = {}
    try:
        from torch._inductor import config as inductor_config

        if hasattr(inductor_config, "emulate_precision_casts"):
            opts["options"] = {"emulate_precision_casts": True}
    except ImportError:  # pragma: no cover
        pass
    return torch.compile(fn, dynamic=False, **opts)


# -- the compiled functions ----------------------------------------------------------------------
def _rms_norm_eager(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, line for line."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _silu_mul_eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _add_rms_norm_eager(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """(RMSNorm(x + y), x + y): a pre-norm layer's residual add and the next norm in one kernel."""
    s = x + y
    return _rms_norm_eager(s, weight, eps), s


_rms_norm = _compile(_rms_norm_eager)
_add_rms_norm = _compile(_add_rms_norm_eager)
_silu_mul = _compile(_silu_mul_eager)


def _lin(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free linear product by the fastest kernel for a few rows, else F.linear."""
    if skinny_matmul.supports(x, weight):
        return skinny_matmul.linear(x, weight)
    return F.linear(x, weight)


# -- patched forwards (bound to instances with types.MethodType, so deepcopy rebinds them) ------
def _norm_forward(self, hidden_states):
    if _ACTIVE:
        return _rms_norm(hidden_states, self.weight, getattr(self, self._rsd_fused_eps))
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    if _ACTIVE:
        gate_up = self.__dict__.get("_rsd_gate_up")
        if gate_up is not None and _still_views(gate_up, self.gate_proj, self.up_proj):  # one product, sliced
            y = _lin(x, gate_up)
            half = gate_up.shape[0] // 2
            return self.down_proj(_silu_mul(y[..., :half], y[..., half:]))
        return self.down_proj(_silu_mul(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


def _linear_forward(self, x):
    if _ACTIVE:
        return _lin(x, self.weight)
    return type(self).forward(self, x)


def _qkv_lead_forward(self, x):
    """q_proj of a fused q/k/v: one product, k_proj's and v_proj's slices handed over for `x`."""
    if _ACTIVE and _still_views(self._rsd_qkv, self, *self._rsd_followers):
        y = _lin(x, self._rsd_qkv)
        parts = y.split(self._rsd_qkv_sizes, dim=-1)
        for follower, part in zip(self._rsd_followers, parts[1:]):
            follower.__dict__["_rsd_stash"] = (x, part)
        return parts[0]
    return type(self).forward(self, x)


def _still_views(fused: torch.Tensor, *linears) -> bool:
    """Whether the linears' weights still live in `fused` (model.to() or a load that replaced the
    parameters would leave `fused` stale: then each module computes its own product)."""
    start = fused.data_ptr()
    for m in linears:
        if m.weight.data_ptr() != start or m.weight.dtype != fused.dtype:
            return False
        start += m.weight.numel() * m.weight.element_size()
    return True


def _layer_forward(self, hidden_states, *args, **kwargs):
    """LlamaDecoderLayer.forward with the residual add after attention fused into the
    post-attention RMSNorm (every keyword goes to self_attn, as the original passes them)."""
    if not _ACTIVE or args:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    post = self.post_attention_layernorm
    hidden_states, residual = _add_rms_norm(residual, hidden_states, post.weight, getattr(post, post._rsd_fused_eps))
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _qkv_follower_forward(self, x):
    stash = self.__dict__.pop("_rsd_stash", None)
    if _ACTIVE:
        if stash is not None and stash[0] is x:
            return stash[1]
        return _lin(x, self.weight)
    return type(self).forward(self, x)


_layer_forward._rsd_fused = "add_rms_norm"
_norm_forward._rsd_fused = "rms_norm"
_mlp_forward._rsd_fused = "silu_mul"
_linear_forward._rsd_fused = "linear"
_qkv_lead_forward._rsd_fused = "qkv"
_qkv_follower_forward._rsd_fused = "qkv_follower"


def _rotary_dispatcher(original):
    compiled = _compile(original)

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if _ACTIVE and not torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        return original(*args, **kwargs)

    dispatch._rsd_fused_original = original
    return dispatch


# -- recognising the modules ---------------------------------------------------------------------
def _code_key(fn, rename: dict | None = None):
    code = inspect.unwrap(fn).__code__
    names = tuple((rename or {}).get(n, n) for n in code.co_names)
    return code.co_code, code.co_consts, names, code.co_argcount


class _LlamaRMSNormForward(torch.nn.Module):
    """transformers 5.x LlamaRMSNorm.forward verbatim: an RMSNorm whose forward compiles to the same
    bytecode computes what `_rms_norm` does (if transformers changes it, nothing matches and no
    norm is fused, rather than fused with the old math)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


_NORM_KEY = _code_key(_LlamaRMSNormForward.forward)


class _LlamaDecoderLayerForward(torch.nn.Module):
    """transformers 5.x LlamaDecoderLayer.forward verbatim (its cache keyword is `cache` from 5.2x,
    `past_key_values` before; _layer_key maps one to the other). A decoder layer whose forward
    compiles to the same bytecode is a pre-norm layer `_layer_forward` may replace."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        # Self Attention
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        # Fully Connected
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


def _layer_key(fn):
    code = inspect.unwrap(fn).__code__
    consts = tuple(tuple("cache" if c == "past_key_values" else c for c in k) if isinstance(k, tuple) else k
                   for k in code.co_consts)
    return code.co_code, consts, code.co_names, code.co_argcount


_LAYER_KEY = _layer_key(_LlamaDecoderLayerForward.forward)


def _is_prenorm_layer(module) -> bool:
    """A decoder layer computing LlamaDecoderLayer's forward whose post-attention norm is
    LlamaRMSNorm's math (then `_layer_forward` computes the same)."""
    fwd = getattr(type(module), "forward", None)
    if fwd is None or not type(module).__name__.endswith("DecoderLayer") or "forward" in module.__dict__:
        return False
    try:
        if _layer_key(fwd) != _LAYER_KEY:
            return False
    except AttributeError:
        return False
    post = getattr(module, "post_attention_layernorm", None)
    return post is not None and _norm_eps_attr(post) is not None


def _norm_eps_attr(module) -> str | None:
    """The eps attribute of an RMSNorm computing exactly LlamaRMSNorm's math, else None."""
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, attr, None), float):
            key = _code_key(type(module).forward, {attr: "variance_epsilon"})
            return attr if key == _NORM_KEY else None
    return None


def _is_silu(act) -> bool:
    return type(act) is torch.nn.SiLU or (type(act).__name__ == "SiLUActivation"
                                          and type(act).__module__.startswith("transformers."))


def _is_silu_mlp(module) -> bool:
    if not all(hasattr(module, a) for a in MLP_ATTRS) or not _is_silu(module.act_fn):
        return False
    fn = inspect.unwrap(type(module).forward)
    # down_proj(act_fn(gate_proj(x)) * up_proj(x)), with or without a temporary: no other names
    return set(fn.__code__.co_names) == set(MLP_ATTRS) and fn.__code__.co_argcount == 2


def _rotary_globals(module) -> dict | None:
    """The namespace an attention forward resolves `apply_rotary_pos_emb` in, if it does."""
    fwd = getattr(type(module), "forward", None)
    if fwd is None:
        return None
    fn = inspect.unwrap(fwd)
    code = getattr(fn, "__code__", None)
    if code is None or _ROTARY_NAME not in code.co_names or not callable(fn.__globals__.get(_ROTARY_NAME)):
        return None
    return fn.__globals__


def _plain_linear(module) -> bool:
    """A bias-free torch.nn.Linear (exactly: subclasses may quantize or add hooks of their own)
    with its class forward."""
    return (type(module) is torch.nn.Linear and module.bias is None and "forward" not in module.__dict__
            and module.weight.dim() == 2)


def _concat_rows(linears) -> torch.Tensor | None:
    """One weight holding the linears' weights as consecutive row blocks, each module's weight
    re-pointed to a view of it; None if they cannot share (input width, dtype, device)."""
    weights = [m.weight for m in linears]
    first = weights[0]
    if not all(_plain_linear(m) for m in linears) or any(
            w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device for w in weights):
        return None
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in weights], dim=0)
        start = 0
        for m, w in zip(linears, weights):
            m.weight.data = fused[start : start + w.shape[0]]
            start += w.shape[0]
    return fused


def _fuse_qkv(attn) -> bool:
    mods = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if any(m is None for m in mods):
        return False
    fused = _concat_rows(mods)
    if fused is None:
        return False
    import types

    q, k, v = mods
    q._rsd_qkv = fused
    q._rsd_qkv_sizes = [m.weight.shape[0] for m in mods]
    q._rsd_followers = (k, v)
    q.forward = types.MethodType(_qkv_lead_forward, q)
    for m in (k, v):
        m.forward = types.MethodType(_qkv_follower_forward, m)
    return True


def _fused_kind(module) -> str | None:
    """"rms_norm" or "silu_mul" when fuse_small_ops patched this instance, else None."""
    return getattr(module.__dict__.get("forward"), "_rsd_fused", None)


def fuse_small_ops(model: torch.nn.Module, matmuls: bool = True) -> dict:
    """Patch `model`'s RMSNorms, SiLU MLPs and rotary embedding to use compiled ops inside
    `enabled()`, and with `matmuls` its q/k/v and gate/up weights (concatenated) and bias-free
    linear layers (skinny_matmul). Idempotent. Returns how many modules of each kind are fused
    now (including any fused by an earlier call): {"rms_norm": n, "silu_mul": n, "rotary": n}
    plus, with `matmuls`, "qkv" (attention modules), "gate_up" (MLPs) and "linear" (other
    linear layers, including the MLPs' down and unfused gate/up projections)."""
    import types

    raise_recompile_limit()
    counts = {"rms_norm": 0, "silu_mul": 0, "rotary": 0, "add_rms_norm": 0}
    if matmuls:
        counts.update(qkv=0, gate_up=0, linear=0)
    skipped = set()
    for module in model.modules():
        kind = _fused_kind(module)
        if kind is None and "forward" not in module.__dict__:
            if (eps_attr := _norm_eps_attr(module)) is not None:
                module._rsd_fused_eps = eps_attr
                module.forward = types.MethodType(_norm_forward, module)
                kind = "rms_norm"
            elif _is_silu_mlp(module):
                # _mlp_forward splits the product in halves: only equal-shaped gate/up share a weight
                if matmuls and module.gate_proj.weight.shape == module.up_proj.weight.shape:
                    gate_up = _concat_rows([module.gate_proj, module.up_proj])
                    if gate_up is not None:
                        module._rsd_gate_up = gate_up
                module.forward = types.MethodType(_mlp_forward, module)
                kind = "silu_mul"
            elif _is_prenorm_layer(module):
                module.forward = types.MethodType(_layer_forward, module)
                kind = "add_rms_norm"
            elif matmuls and _plain_linear(module):
                module.forward = types.MethodType(_linear_forward, module)
                kind = "linear"
            elif type(module).__name__.endswith("RMSNorm"):
                skipped.add(type(module).__name__)
        if matmuls and "_rsd_gate_up" in module.__dict__:
            counts["gate_up"] += 1
        if matmuls and kind is None and _fuse_qkv_once(module):
            counts["qkv"] += 1
        if kind in counts and kind != "qkv":  # a fused q/k/v counts once, at its attention module
            counts[kind] += 1
        g = _rotary_globals(module)
        if g is not None:
            if not hasattr(g[_ROTARY_NAME], "_rsd_fused_original"):
                g[_ROTARY_NAME] = _rotary_dispatcher(g[_ROTARY_NAME])
                _PATCHED_GLOBALS.append(g)
            counts["rotary"] += 1
    if skipped:
        log.info("fuse_small_ops: left alone (not LlamaRMSNorm's math): %s", ", ".join(sorted(skipped)))
    return counts


def _fuse_qkv_once(module) -> bool:
    """Fuse an attention module's q/k/v if not done yet; True if they are fused (now or before)."""
    q = getattr(module, "q_proj", None)
    if isinstance(q, torch.nn.Module) and _fused_kind(q) == "qkv":
        return True
    return hasattr(module, "k_proj") and hasattr(module, "v_proj") and _fuse_qkv(module)


def unfuse_small_ops(model: torch.nn.Module) -> None:
    """Give `model`'s patched modules their class forwards back (the rotary globals stay; see
    restore_rotary). Concatenated weights stay concatenated: each module's weight is a view of
    them and computes what it did before."""
    for module in model.modules():
        if _fused_kind(module) is not None:
            del module.forward
        for attr in ("_rsd_fused_eps", "_rsd_gate_up", "_rsd_qkv", "_rsd_qkv_sizes", "_rsd_followers",
                     "_rsd_stash"):
            module.__dict__.pop(attr, None)


def restore_rotary() -> None:
    """Put back the original apply_rotary_pos_emb of every modeling module patched here (for all
    models in the process)."""
    while _PATCHED_GLOBALS:
        g = _PATCHED_GLOBALS.pop()
        fn = g.get(_ROTARY_NAME)
        if hasattr(fn, "_rsd_fused_original"):
            g[_ROTARY_NAME] = fn._rsd_fused_original
