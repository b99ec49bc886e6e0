"""A draft model whose embedding and output head cover only the N most frequent target tokens.

SmolLM2's vocabulary has 49152 tokens; a 2-layer draft with hidden size 384 would spend most of
its parameters (and most of its per-call memory traffic) on a full-vocabulary embedding and head.
`TrimmedVocabLM` wraps a transformers ``LlamaForCausalLM`` whose vocabulary has N + 1 rows:

* rows 0..N-1 are the kept target tokens, ``out_ids[row]`` = full-vocabulary token id;
* row N is the "other" token: every input token outside the kept set is mapped to it
  (``in_map[token] = N``). Its output logit is never used.

``forward`` takes full-vocabulary ``input_ids`` and returns logits over the FULL vocabulary
``[batch, seq, V_full]``: the kept tokens carry the inner model's logits, every other token
(and the "other" row) gets ``-inf``, so a softmax gives exactly 0 there. Speculative decoding stays
exact: the engine uses the draft's actual distribution D (zero outside the kept set), and
min(1, T(x)/D(x)) / the residual max(T - D, 0) handle tokens the draft can never propose.

Interface the engine relies on (same as any HF causal LM):

* ``forward(input_ids, attention_mask=None, position_ids=None, use_cache=None, **kwargs)``; kwargs
  (the KV cache as ``cache=`` in transformers >= 5.2x or ``past_key_values=`` in 5.17,
  ``logits_to_keep``, ...) go to the inner model untouched. Attention masks and position ids
  do not depend on the vocabulary, so tree masks work unchanged.
* ``config``: a view of the inner model's config in which ``vocab_size`` is V_full (the size of
  the logits the wrapper returns, equal to the target's ``config.vocab_size``);
  ``config.trimmed_vocab_size`` is N and ``config.inner_vocab_size`` is N + 1. Every other
  attribute reads/writes through to the inner config. The wrapper also exposes
  ``vocab_size`` (= V_full) and ``kept_vocab_size`` (= N) directly. Token ids stored in the config
  (bos/eos/pad) are full-vocabulary ids.
* ``num_parameters()``: the real parameter count of the inner model (tied weights counted once);
  the maps are buffers, not parameters.

On disk (`save_trimmed` / `load_trimmed`): ``config.json`` (the inner LlamaConfig, vocab N + 1),
``model.safetensors`` (inner weights; a tied head is stored once), ``vocab_map.safetensors``
(``out_ids``, int64) and the marker ``rsd_trimmed_vocab.json`` (format, V_full, N, dtype), written
last. `load_draft` loads such a directory or, failing the marker, any HF causal LM (local dir or hub id).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dtypes import to_dtype

__all__ = [
    "MARKER",
    "TrimmedVocabLM",
    "TrimmedConfigView",
    "is_trimmed_dir",
    "save_trimmed",
    "load_trimmed",
    "load_draft",
]

MARKER = "rsd_trimmed_vocab.json"
FORMAT = "rsd-bench-trimmed-vocab"
FORMAT_VERSION = 1


class TrimmedConfigView:
    """The inner config with ``vocab_size`` reported as the full vocabulary size.

    Reads of other attributes and all writes go to the inner config, so e.g. setting
    ``_attn_implementation`` on the wrapper's config affects the inner model.
    """

    def __init__(self, base, full_vocab_size: int, kept: int):
        object.__setattr__(self, "_base", base)
        object.__setattr__(
            self,
            "_overrides",
            {"vocab_size": int(full_vocab_size), "trimmed_vocab_size": int(kept), "inner_vocab_size": int(kept) + 1},
        )

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._overrides:
            raise AttributeError(f"{name} of a trimmed-vocabulary draft is fixed")
        setattr(self._base, name, value)

    def to_dict(self) -> dict:
        d = self._base.to_dict()
        d.update(self._overrides)
        return d

    def get_text_config(self, *args, **kwargs):
        return self

    def __repr__(self) -> str:
        o = self._overrides
        return (f"TrimmedConfigView(vocab_size={o['vocab_size']}, kept={o['trimmed_vocab_size']}, "
                f"inner={self._base.__class__.__name__})")


class TrimmedVocabLM(nn.Module):
    """Full-vocabulary causal-LM interface around an inner LM with N kept tokens + 1 "other" row."""

    def __init__(self, inner: nn.Module, out_ids, full_vocab_size: int):
        super().__init__()
        out_ids = torch.as_tensor(out_ids, dtype=torch.long).flatten().cpu()
        n = int(out_ids.numel())
        if n == 0:
            raise ValueError("a trimmed vocabulary needs at least one kept token")
        if int(inner.config.vocab_size) != n + 1:
            raise ValueError(f"inner vocab_size {inner.config.vocab_size} != kept tokens {n} + 1 ('other' row)")
        if int(out_ids.min()) < 0 or int(out_ids.max()) >= full_vocab_size:
            raise ValueError(f"kept token ids must lie in [0, {full_vocab_size})")
        if torch.unique(out_ids).numel() != n:
            raise ValueError("kept token ids must be distinct")
        self.inner = inner
        in_map = torch.full((int(full_vocab_size),), n, dtype=torch.long)
        in_map[out_ids] = torch.arange(n)
        dev = next(inner.parameters()).device
        self.register_buffer("in_map", in_map.to(dev), persistent=False)
        self.register_buffer("out_ids", out_ids.to(dev), persistent=False)
        self.full_vocab_size = int(full_vocab_size)
        self.kept_vocab_size = n
        self.config = TrimmedConfigView(inner.config, full_vocab_size, n)

    # -- attributes the engine / HF utilities look for ------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.full_vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        fn = getattr(self.inner, "num_parameters", None)
        if callable(fn):
            return int(fn(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings))
        seen, total = set(), 0
        for p in self.inner.parameters():
            if id(p) in seen or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["inner"], name)

    # -- mapping -------------------------------------------------------------------------------
    def map_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> inner rows (tokens outside the kept set -> N)."""
        return self.in_map[input_ids]

    def expand_logits(self, small: torch.Tensor) -> torch.Tensor:
        """Inner logits [..., N+1] -> full-vocabulary logits [..., V_full] with -inf off the kept set."""
        full = small.new_full((*small.shape[:-1], self.full_vocab_size), float("-inf"))
        full.index_copy_(-1, self.out_ids, small[..., : self.kept_vocab_size])
        return full

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        if input_ids is None:
            raise ValueError("TrimmedVocabLM needs input_ids (inputs_embeds would bypass the vocabulary map)")
        if kwargs.get("labels") is not None:
            raise NotImplementedError("TrimmedVocabLM does not compute a loss; train the inner model (see rsd_bench.distill)")
        out = self.inner(
            input_ids=self.map_inputs(input_ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        out.logits = self.expand_logits(out.logits)
        return out


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def is_trimmed_dir(path) -> bool:
    return Path(path, MARKER).is_file() if path is not None else False


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_trimmed(model: TrimmedVocabLM, directory, dtype=None, extra: dict | None = None) -> Path:
    """Write a trimmed draft to `directory` (created if needed).

    Each file is written to a temporary name and renamed into place; the marker comes last, so a
    directory with the marker always holds a complete, loadable draft (checkpoints overwrite it).
    `dtype` (e.g. "bfloat16") casts the floating-point weights for storage; default: as they are.
    """
    from safetensors.torch import save_file

    if not isinstance(model, TrimmedVocabLM):
        raise TypeError(f"save_trimmed expects a TrimmedVocabLM, got {type(model).__name__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    inner = model.inner
    target_dtype = to_dtype(dtype) if dtype is not None else None
    tied = bool(getattr(inner.config, "tie_word_embeddings", False))
    sd = {}
    seen = {}
    for k, v in inner.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        if v.data_ptr() in seen and v.numel() > 0:  # any other shared storage: store once
            continue
        seen[v.data_ptr()] = k
        v = v.detach()
        if target_dtype is not None and v.is_floating_point():
            v = v.to(target_dtype)
        sd[k] = v.contiguous().cpu()
    stored_dtype = str(next(iter(v for v in sd.values() if v.is_floating_point())).dtype).replace("torch.", "")

    cfg = inner.config.to_dict()
    cfg["dtype"] = stored_dtype
    cfg.pop("torch_dtype", None)
    _atomic_write_bytes(d / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str)))
    _atomic_write_bytes(d / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    _atomic_write_bytes(
        d / "vocab_map.safetensors",
        lambda p: save_file({"out_ids": model.out_ids.detach().cpu().contiguous()}, str(p), metadata={"format": "pt"}),
    )
    marker = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "full_vocab_size": model.full_vocab_size,
        "kept_vocab_size": model.kept_vocab_size,
        "other_row": model.kept_vocab_size,
        "inner_model_type": getattr(inner.config, "model_type", None),
        "dtype": stored_dtype,
        "num_parameters": model.num_parameters(),
    }
    if extra:
        marker.update(extra)
    _atomic_write_bytes(d / MARKER, lambda p: p.write_text(json.dumps(marker, indent=2)))
    return d


def load_trimmed(directory, dtype="float32", device="cpu") -> TrimmedVocabLM:
    """Load a directory written by `save_trimmed`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(directory)
    if not is_trimmed_dir(d):
        raise FileNotFoundError(f"{d} is not a trimmed-vocabulary draft (no {MARKER})")
    marker = json.loads((d / MARKER).read_text())
    if marker.get("format") != FORMAT or int(marker.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{d / MARKER}: unsupported format {marker.get('format')!r} v{marker.get('format_version')}")
    cfg_dict = json.loads((d / "config.json").read_text())
    model_type = cfg_dict.pop("model_type", "llama")
    cfg_dict.pop("dtype", None)
    cfg_dict.pop("transformers_version", None)
    config = AutoConfig.for_model(model_type, **cfg_dict)
    torch_dtype = to_dtype(dtype)
    inner = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    sd = load_file(str(d / "model.safetensors"))
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"{d}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    if tied:
        inner.tie_weights()
    out_ids = load_file(str(d / "vocab_map.safetensors"))["out_ids"]
    model = TrimmedVocabLM(inner, out_ids, int(marker["full_vocab_size"]))
    return model.to(device=device).eval()


def load_draft(path_or_id, dtype="float32", device="cpu"):
    """A draft model: a trimmed-vocabulary directory (marker file) or any HF causal LM dir / hub id."""
    if isinstance(path_or_id, (str, os.PathLike)) and is_trimmed_dir(path_or_id):
        return load_trimmed(path_or_id, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=to_dtype(dtype))
    return model.to(device).eval()
