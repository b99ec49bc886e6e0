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


_rms_norm = _compile(_rms_norm_eager)
_silu_mul = _compile(_silu_mul_eager)


# -- patched forwards (bound to instances with types.MethodType, so deepcopy rebinds them) ------
def _norm_forward(self, hidden_states):
    if _ACTIVE:
        return _rms_norm(hidden_states, self.weight, getattr(self, self._rsd_fused_eps))
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    if _ACTIVE:
        return self.down_proj(_silu_mul(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


_norm_forward._rsd_fused = "rms_norm"
_mlp_forward._rsd_fused = "silu_mul"


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


def _fused_kind(module) -> str | None:
    """"rms_norm" or "silu_mul" when fuse_small_ops patched this instance, else None."""
    return getattr(module.__dict__.get("forward"), "_rsd_fused", None)


def fuse_small_ops(model: torch.nn.Module) -> dict:
    """Patch `model`'s RMSNorms, SiLU MLPs and rotary embedding to use compiled ops inside
    `enabled()`. Idempotent. Returns how many modules of each kind are fused now (including any
    fused by an earlier call): {"rms_norm": n, "silu_mul": n, "rotary": n}."""
    import types

    raise_recompile_limit()
    counts = {"rms_norm": 0, "silu_mul": 0, "rotary": 0}
    skipped = set()
    for module in model.modules():
        kind = _fused_kind(module)
        if kind is None and "forward" not in module.__dict__:
            if (eps_attr := _norm_eps_attr(module)) is not None:
                module._rsd_fused_eps = eps_attr
                module.forward = types.MethodType(_norm_forward, module)
                kind = "rms_norm"
            elif _is_silu_mlp(module):
                module.forward = types.MethodType(_mlp_forward, module)
                kind = "silu_mul"
            elif type(module).__name__.endswith("RMSNorm"):
                skipped.add(type(module).__name__)
        if kind is not None:
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


def unfuse_small_ops(model: torch.nn.Module) -> None:
    """Give `model`'s patched modules their class forwards back (the rotary globals stay; see
    restore_rotary)."""
    for module in model.modules():
        if _fused_kind(module) is not None:
            del module.forward
            module.__dict__.pop("_rsd_fused_eps", None)


def restore_rotary() -> None:
    """Put back the original apply_rotary_pos_emb of every modeling module patched here (for all
    models in the process)."""
    while _PATCHED_GLOBALS:
        g = _PATCHED_GLOBALS.pop()
        fn = g.get(_ROTARY_NAME)
        if hasattr(fn, "_rsd_fused_original"):
            g[_ROTARY_NAME] = fn._rsd_fused_original
