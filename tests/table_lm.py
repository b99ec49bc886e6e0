"""A fake causal LM whose next-token logits are a table lookup on (position, last token).

It has the Hugging Face call signature the engine uses, so the whole engine runs on it (tree
building, verification walk, cache bookkeeping), but each forward costs microseconds. Because it
is Markov, the exact distribution of the first tokens after a prompt is a product of table rows.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from rsd_bench.sampling import to_probs


class TableLM(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = logits  # [positions, V, V]: (position, token) -> next-token logits

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None, **kwargs):
        pos = position_ids.clamp(max=self.table.shape[0] - 1)
        return SimpleNamespace(logits=self.table[pos, input_ids])


def random_table(vocab: int, positions: int, seed: int, sharpness: float = 2.0,
                 never: tuple[int, ...] = ()) -> torch.Tensor:
    """Random logits; tokens in `never` get probability exactly 0 (logit -inf)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(positions, vocab, vocab, generator=g) * sharpness
    for tok in never:
        t[..., tok] = -float("inf")
    return t


def exact_distribution(table: torch.Tensor, prompt: list[int], n: int, temperature: float,
                       top_p: float | None = None) -> dict[tuple, float]:
    """P(first n generated tokens) of the Markov table model after `prompt`."""
    vocab = table.shape[-1]
    start = len(prompt) - 1
    probs = {}
    for seq in itertools.product(range(vocab), repeat=n):
        p, prev = 1.0, prompt[-1]
        for i, tok in enumerate(seq):
            row = to_probs(table[min(start + i, table.shape[0] - 1), prev][None], temperature, top_p)[0]
            p *= float(row[tok])
            prev = tok
            if p == 0.0:
                break
        probs[seq] = p
    return probs
