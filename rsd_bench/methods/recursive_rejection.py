"""Recursive rejection sampling (RRS) over siblings drawn without replacement, in draw order.

R starts as the target T and Q as the draft D. Accept x_j with probability min(1, R(x_j)/Q(x_j));
on rejection R <- norm(max(R - Q, 0)) and Q <- Q without x_j, renormalised. If all are rejected,
sample from R. With one proposal this is exactly the SD rule of Leviathan et al. / Chen et al.

Every node of a tree is decided at once (rows), one sibling position per step: the engine reads
the decisions with one host synchronisation per block, not one per visited node.
"""

from __future__ import annotations

import torch

from ..sampling import normalize, sample_rows, uniform


def recursive_rejection(target_p: torch.Tensor, draft_p: torch.Tensor, proposals: torch.Tensor,
                        settings: dict, gen: torch.Generator):
    n, k = proposals.shape
    r, q = target_p, draft_p
    u = uniform(gen, (n, k), target_p.device)
    choice = torch.full((n,), -1, dtype=torch.long, device=target_p.device)
    for j in range(k):
        x = proposals[:, j : j + 1]
        valid = x >= 0  # rows with fewer proposals are padded with -1
        x = x.clamp_min(0)
        # u < R/Q  <=>  u*Q < R, avoiding a division by a tiny Q
        accept = valid[:, 0] & (choice < 0) & (u[:, j] * q.gather(1, x)[:, 0] < r.gather(1, x)[:, 0])
        choice = torch.where(accept, j, choice)
        # a decided row's R no longer matters; a padded position leaves R and Q as they were
        r = torch.where(valid, normalize((r - q).clamp_min(0.0), r), r)
        if j + 1 < k:
            dropped = q.scatter(1, x, 0.0)
            q = torch.where(valid, normalize(dropped, dropped), q)
    return choice, sample_rows(r, gen)
