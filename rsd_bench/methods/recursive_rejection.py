"""Recursive rejection sampling (RRS) over siblings drawn without replacement, in draw order.

R starts as the target T and Q as the draft D. Accept x_j with probability min(1, R(x_j)/Q(x_j));
on rejection R <- norm(max(R - Q, 0)) and Q <- Q without x_j, renormalised. If all are rejected,
sample from R. With one proposal this is exactly the SD rule of Leviathan et al. / Chen et al.
"""

from __future__ import annotations

import torch

from ..sampling import normalize, sample, uniform


def recursive_rejection(target_p: torch.Tensor, draft_p: torch.Tensor, proposals: list[int],
                        settings: dict, gen: torch.Generator):
    r, q = target_p, draft_p
    for j, x in enumerate(proposals):
        # u < R/Q  <=>  u*Q < R, avoiding a division by a tiny Q
        if bool(uniform(gen) * q[x] < r[x]):
            return j, None
        r = normalize((r - q).clamp_min(0.0), r)
        q = q.clone()
        q[x] = 0.0
        q = normalize(q, q)
    return None, sample(r, gen)
