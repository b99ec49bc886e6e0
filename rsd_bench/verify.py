"""Verification of a whole draft tree with one host synchronisation.

The method's verifier decides every node with proposals at once, and a bonus token is drawn from
the target at every node; the walk from the root then only reads host lists. Deciding nodes the
walk never reaches costs a little GPU work, while a host synchronisation per visited node (the
walk's old shape) cost more than the whole verification on a GPU. Each node's decision uses its
own random draws, so the nodes on the walked path are decided exactly as one at a time would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample_rows
from .tree import DraftTree


@dataclass
class Walk:
    path: list[int]  # accepted nodes from the root down, root excluded
    last: int  # the token after the path: a residual sample, or the bonus token at a leaf
    depths_tried: list[int]  # depths at which the walk met proposals


def decide(verify_children, tree: DraftTree, target_probs: torch.Tensor, settings: dict,
           gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(choice, token) per tree node as host lists: choice is the accepted proposal's index or
    -1 (all rejected, or a leaf); token is the residual sample where all were rejected and the
    target's bonus token at a leaf."""
    n, dev = len(tree), target_probs.device
    token = sample_rows(target_probs, gen)  # bonus tokens, replaced at nodes with proposals
    internal = [i for i in range(n) if tree.proposals[i]]
    if not internal:
        return [-1] * n, token.tolist()
    m, k = len(internal), max(len(tree.proposals[i]) for i in internal)
    flat = list(internal)
    for i in internal:
        flat += [tree.tokens[c] for c in tree.proposals[i]] + [-1] * (k - len(tree.proposals[i]))
    host = torch.tensor(flat, dtype=torch.long)  # one small copy for rows and proposals
    rows, proposals = host.to(dev, non_blocking=True).split([m, m * k])
    choice_i, token_i = verify_children(target_probs.index_select(0, rows),
                                        torch.stack([tree.draft_probs[i] for i in internal]),
                                        proposals.view(m, k), settings, gen)
    choice = torch.full((n,), -1, dtype=torch.long, device=dev).index_copy_(0, rows, choice_i.long())
    token = token.index_copy(0, rows, token_i.long())
    both = torch.cat([choice, token]).tolist()  # the block's one synchronisation
    return both[:n], both[n:]


def walk(tree: DraftTree, choice: list[int], token: list[int]) -> Walk:
    """Follow the accepted proposals from the root until a rejection or a leaf."""
    node, path, tried = 0, [], []
    while tree.proposals[node]:
        tried.append(tree.depth[node])
        if choice[node] < 0:
            break
        node = tree.proposals[node][choice[node]]
        path.append(node)
    return Walk(path=path, last=token[node], depths_tried=tried)
