"""Turning logits into the distributions every method samples from, and the random draws.

Draft and target go through the same `to_probs`, so "the target's distribution" always means the
target after temperature / top-p. All arithmetic is float32 or wider whatever the model dtype,
because acceptance ratios of half-precision probabilities are noisy (a known trap).
"""

from __future__ import annotations

import math

import torch

from .device_graph import UniformPool, graphed


def to_probs(logits: torch.Tensor, temperature: float, top_p: float | None = None) -> torch.Tensor:
    """Rows of logits -> rows of probabilities (float32). temperature 0 means argmax (one-hot)."""
    if logits.dtype != torch.float32:  # a call less for the fast runners' float logits
        logits = logits.float()
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)  # one launch less
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def uniform(gen, shape=(), device=None) -> torch.Tensor:
    if isinstance(gen, UniformPool):
        return gen.take(shape)
    return torch.rand(shape, generator=gen, device=device or gen.device, dtype=torch.float32)


def zero_stands_for_top(device) -> bool:
    """What a uniform number of exactly 0 stands for (it comes about once per 2^24-2^25 numbers:
    a vocabulary row's worth every few hundred draws, so what replaces it matters).

    On the CPU torch's uniform numbers are multiples of 2^-24 in [0, 1): 0 is the bottom cell
    [0, 2^-24). On CUDA, uniform_ turns curand's (0, 1] into [0, 1) by mapping 1.0 to 0.0 and
    keeps the fine values near 0, so there 0 stands for the top of the range, (1 - 2^-25, 1].
    """
    return torch.device(device).type == "cuda"


# -log(1 - U) and -log(-log(U)) in the middle of the cell a U of 0 stands for
_ZERO_RACE = {False: 2.0**-25, True: 26 * math.log(2.0)}
_ZERO_GUMBEL = {False: -math.log(25 * math.log(2.0)), True: 26 * math.log(2.0)}


def gumbel(gen, shape, device=None) -> torch.Tensor:
    u = uniform(gen, shape, device)
    g = -torch.log(-torch.log(u.clamp(max=1.0 - 2.0**-24)))  # -inf at u = 0, replaced below
    return torch.where(u > 0, g, _ZERO_GUMBEL[zero_stands_for_top(u.device)])


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores.topk(k, dim=-1), descending. Small k on a GPU as k argmax passes: topk's radix
    selection over a long row launches a few kernels per radix pass (8 passes for float64),
    which made it the costliest host call of RSD-C's and RSD-S's draft levels."""
    if scores.device.type != "cuda" or k > 4:
        return scores.topk(k, dim=-1)
    return top_k_by_argmax(scores, k)


def top_k_by_argmax(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    work = scores.clone()
    values, indices = [], []
    for _ in range(k):
        v, i = row_max(work)
        values.append(v[..., None])
        indices.append(i[..., None])
        work.scatter_(-1, i[..., None], -torch.inf)
    return torch.cat(values, -1), torch.cat(indices, -1)


CHUNK = 512  # row_max's first stage: elements per partial maximum


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maximum, index of its first occurrence) over the last dimension of a floating-point x,
    like x.max(-1).

    Long rows go in two stages, maxima of 512-element chunks and then the maximum of those:
    one reduction over a whole row runs as one thread block per row, and Inductor does not
    split an arg-reduction, so a draw from one vocabulary row (32 000 entries) took 14 us of
    GPU time and RSD-S's beam level (two rows flattened) ~60 us; chunks spread a row over
    ~60 blocks. Ties resolve as in x.max(-1): the first chunk holding the maximum, and the
    first occurrence within it.
    """
    n = x.shape[-1]
    if n < 4 * CHUNK:
        values, index = x.max(-1)
        return values, index
    chunks = -(-n // CHUNK)
    if chunks * CHUNK != n:
        x = torch.nn.functional.pad(x, (0, chunks * CHUNK - n), value=-torch.inf)
    part_v, part_i = x.unflatten(-1, (chunks, CHUNK)).max(-1)
    values, chunk = part_v.max(-1, keepdim=True)
    return values[..., 0], (chunk * CHUNK + part_i.gather(-1, chunk))[..., 0]


def sample_rows(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of (unnormalised) probabilities, as a device tensor: no host sync.

    Exponential race: with E_i ~ Exp(1) i.i.d., argmax_i p_i / E_i = argmin_i E_i / p_i is token i
    with probability p_i / sum(p), and a zero-probability token can never win. torch.multinomial
    draws the same way but first validates its input with two host synchronisations on a GPU,
    which cost more than the draw itself at every draft step and verified node.
    """
    if isinstance(gen, UniformPool):
        # -log(1 - U), U in [0, 1): Exp(1). A U of exactly 0 gets the race value of the cell it
        # stands for (zero_stands_for_top). Left at 0 and clamped to float32's tiny, p / E made
        # its token win whatever its probability: tokens of p < ~1e-7 were drawn up to ~V 2^-24
        # too often, and on CUDA, where 0 stands for U near 1, that token should almost never win.
        u = gen.take(probs.shape)
        race = torch.where(u > 0, torch.log1p(-u).neg_(), _ZERO_RACE[zero_stands_for_top(u.device)])
    else:  # exponential_ excludes 0 in current PyTorch; the clamp keeps p / E finite regardless
        race = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=gen)
        race.clamp_min_(torch.finfo(torch.float32).tiny)
    return row_max(probs / race)[1]


@graphed
def _sample_rows_graphed(probs: torch.Tensor, gen) -> torch.Tensor:
    return sample_rows(probs, gen)


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from a probability vector (host int); a CUDA graph on a GPU."""
    return int(_sample_rows_graphed(probs, gen=gen))


def normalize(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """weights / sum over the last dimension, or `fallback` where the weights vanish (residuals of
    identical distributions); rows of a 2-D tensor independently.

    Decided on the device: a host test of the sum would stall the GPU queue once per rejection.
    """
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), fallback)
