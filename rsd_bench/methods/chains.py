"""Draft chains grown on the device: SD's one chain and SpecTr's K i.i.d. chains.

Each level is one batched draft call over the K chains' rows. Chains that have drawn the same
tokens so far sit at the same tree node: they draw their next tokens from that node's first
row (`rep`), so every node's proposals are i.i.d. draws from one distribution, the one the
verifier is given (the tree keeps each node's first row). Nothing is read on the host until
the engine builds the tree after the last level.
"""

import torch

from ..device_graph import constant, graphed
from ..sampling import sample_rows


@graphed
def chain_level(probs: torch.Tensor, rep: torch.Tensor, gen):
    """Chain i draws from row rep[i] of probs. Returns (rows [parent = rep; token; alive] for
    draft.children, the new rep: the first chain at each new node)."""
    tokens = sample_rows(probs.index_select(0, rep), gen)
    same = (rep[:, None] == rep[None, :]) & (tokens[:, None] == tokens[None, :])
    chains = torch.arange(len(rep), device=rep.device)
    first = torch.where(same, chains, len(rep)).amin(1)
    return torch.stack([rep, tokens, torch.ones_like(rep)]), first


def draft_chains(draft, chains: int, length: int, gen) -> None:
    probs = draft([0])
    rep = constant(0, chains, torch.long, probs.device)  # every chain starts at the root
    draft.grow(chain_level, probs, (rep,), gen, [{}] * length)
