"""Turning logits into the distributions every method samples from, and the random draws.

Draft and target go through the same `to_probs`, so "the target's distribution" always means the
target after temperature / top-p. All arithmetic is float32 or wider whatever the model dtype,
because acceptance ratios of half-precision probabilities are noisy (a known trap).
"""

from __future__ import annotations

import torch


def to_probs(logits: torch.Tensor, temperature: float, top_p: float | None = None) -> torch.Tensor:
    """Rows of logits -> rows of probabilities (float32). temperature 0 means argmax (one-hot)."""
    logits = logits.float()
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def uniform(gen: torch.Generator, shape=(), device=None) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device or gen.device, dtype=torch.float32)


def gumbel(gen: torch.Generator, shape, device=None) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, device=device or gen.device, dtype=torch.float32)
    # clamp keeps -log(-log(u)) finite at the ends of float32's range
    u = u.clamp(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return -torch.log(-torch.log(u))


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from a probability vector (host int)."""
    return int(torch.multinomial(probs, 1, generator=gen).item())


def normalize(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """weights / sum, or `fallback` when the weights vanish (residuals of identical distributions).

    Decided on the device: a host test of the sum would stall the GPU queue once per rejection.
    """
    total = weights.sum()
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), fallback)
