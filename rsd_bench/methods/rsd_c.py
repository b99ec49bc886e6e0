"""RSD-C: a tree with constant per-level branching factors b = (b1..bL).

Level l is one batched draft call over all level l-1 rows; each draws b_l distinct children by
Gumbel-Top-k (top b_l of log D + Gumbel noise, descending = a without-replacement sample in draw
order, which is what recursive rejection sampling needs). Tokens the draft gives probability 0
are never drawn, so a node may get fewer than b_l children.
"""

import math

import torch

from ..device_graph import constant, graphed
from ..sampling import gumbel, top_k
from .recursive_rejection import recursive_rejection
from .registry import Method, register


def branching_from_rule(rule: str, width: int, L: int) -> list[int]:
    """Derive b from a width: 'first' = (w, 1, ..., 1); 'all' = (w, ..., w)."""
    if rule == "first":
        return [width] + [1] * (L - 1)
    if rule == "all":
        return [width] * L
    raise ValueError(f"unknown rsd_c branching_rule {rule!r}; use 'first' or 'all', or give branching")


@graphed
def branch_level(probs: torch.Tensor, alive: torch.Tensor, gen, b: int):
    """Gumbel-top-b children of every row: (rows [parent; token; alive] (long [3, rows * b]),
    their alive row), parent-major and each parent's children in draw order. A child is dead
    where its parent is or its score is -inf (a token of draft probability 0)."""
    scores = probs.log() + gumbel(gen, probs.shape, probs.device)
    values, tokens = top_k(scores, min(b, probs.shape[-1]))
    parent = torch.arange(probs.shape[0], device=probs.device).repeat_interleave(values.shape[-1])
    rows = torch.stack([parent, tokens.flatten(), ((alive[parent] != 0) & (values.flatten() > -math.inf)).long()])
    return rows, rows[2]


def draft_constant_branching(tree, draft, settings, gen) -> None:
    probs = draft([0])
    alive = constant(1, 1, torch.long, probs.device)
    # static shapes: prod(b[:depth]) rows at each depth
    draft.grow(branch_level, probs, (alive,), gen, [{"b": b} for b in settings["branching"]])


def _resolve(s: dict) -> dict:
    L = s["L"]
    b = s.get("branching")
    if b is None or b == "":
        b = branching_from_rule(s.get("branching_rule") or "first", int(s["width"]), L)
    elif isinstance(b, str):
        b = [int(x) for x in b.replace(",", "-").split("-") if x]
    b = [int(x) for x in b]
    if len(b) != L:
        raise ValueError(f"rsd_c branching {b} has {len(b)} levels but the draft length L is {L}")
    if any(x < 1 for x in b):
        raise ValueError(f"rsd_c branching factors must be >= 1, got {b}")
    s["branching"] = b
    return s


RSD_C = register(Method(name="rsd_c", label="RSD-C", draft_tree=draft_constant_branching,
                        verify_children=recursive_rejection,
                        params={"branching": None, "branching_rule": "first", "width": 2},
                        resolve=_resolve,
                        describe=lambda s: "b=" + "-".join(map(str, s["branching"])),
                        max_nodes=lambda s: 1 + sum(math.prod(s["branching"][: i + 1])
                                                    for i in range(len(s["branching"]))),
                        fixed_levels=True))
