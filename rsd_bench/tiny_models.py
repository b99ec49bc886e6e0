"""Tiny random models and a byte tokenizer, built in code: the offline stand-ins that test the plumbing.

A spec string names one: "random-llama" or "random-llama:layers-2:hidden-64:seed-1" (the form that
needs no quoting in Hydra overrides; "layers=2,hidden=64" works too). Two specs that differ only
in size/seed share the byte tokenizer, so they form a valid (target, draft) pair.
"""

from __future__ import annotations

import re

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 byte tokens plus <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tokenizers.processors import TemplateProcessing

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.name_or_path = "byte-tokenizer"
    return fast


def parse_spec(spec: str) -> dict:
    name, _, args = spec.partition(":")
    if name != "random-llama":
        raise ValueError(f"not a random model spec: {spec!r}")
    out = {"layers": 2, "hidden": 64, "heads": 4, "seed": 0, "context": 2048}
    for item in filter(None, re.split(r"[:,]", args)):
        key, _, value = item.replace("=", "-").partition("-")
        if key not in out:
            raise ValueError(f"unknown key {key!r} in {spec!r}; known: {', '.join(out)}")
        out[key] = int(value)
    return out


def tiny_llama(vocab_size: int = 259, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0,
               context: int = 2048, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=context,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Random init gives near-uniform next-token distributions; sharper logits make tests meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.to(dtype).eval()


def load_random(spec: str, dtype: torch.dtype = torch.float32):
    opts = parse_spec(spec)
    return tiny_llama(vocab_size=259, dtype=dtype, **opts), byte_tokenizer()
