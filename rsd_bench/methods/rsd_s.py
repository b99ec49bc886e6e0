"""RSD-S: a draft tree from Stochastic Beam Search (Kool et al. 2019) with beam width W.

Each beam item y has phi(y) (sum of draft log-probs) and a Gumbel score G(y) (root: 0, 0).
Children get G'(x) = phi(y) + log D(x|y) + Gumbel, shifted so their maximum equals G(y); the top
W over all expansions survive. Within a parent the shift is monotone, so its kept children are a
prefix of its Gumbel order: a without-replacement sample in draw order, verified by recursive
rejection sampling. A parent with no surviving child is a leaf (early truncation).
"""

import math

import torch

from ..sampling import gumbel, top_k
from .recursive_rejection import recursive_rejection
from .registry import Method, register


def shift_gumbel(perturbed: torch.Tensor, target_max: torch.Tensor) -> torch.Tensor:
    """Shift rows of Gumbel-perturbed scores so each row's maximum becomes target_max.

    Stable form of -log(exp(-T) - exp(-Z) + exp(-G')) (Kool et al. 2019, appendix B).
    """
    z = perturbed.max(-1, keepdim=True).values
    t = target_max.unsqueeze(-1)
    u = t - perturbed + torch.log1p(-torch.exp(perturbed - z))
    return t - u.clamp_min(0.0) - torch.log1p(torch.exp(-u.abs()))


def draft_stochastic_beam(tree, draft, settings, gen) -> None:
    width = settings["W"]
    frontier = [0]
    phi = score = None  # per beam item, float64 on the draft's device
    for _ in range(settings["L"]):
        probs = draft(frontier)
        dev = probs.device
        if phi is None:
            phi = score = torch.zeros(1, dtype=torch.float64, device=dev)
        logp = probs.double().log()
        child_phi = phi[:, None] + logp
        perturbed = child_phi + gumbel(gen, probs.shape, dev).double()
        shifted = shift_gumbel(perturbed, score)
        vocab = probs.shape[-1]
        values, flat = top_k(shifted.view(-1), min(width, shifted.numel()))
        # one host read per level (flat indices < W * V are exact in float64)
        kept = [(i, int(f)) for i, (v, f) in enumerate(zip(*torch.stack([values, flat.double()]).tolist()))
                if v > -math.inf]
        if len(kept) < len(flat):  # children of zero draft probability never survive
            idx = torch.tensor([i for i, _ in kept], dtype=torch.long, device=dev)
            values, flat = values[idx], flat[idx]
        # global descending order => each parent's children are proposed in their draw order
        frontier = [tree.propose(frontier[f // vocab], f % vocab) for _, f in kept]
        phi, score = child_phi.view(-1)[flat], values


def _resolve(s: dict) -> dict:
    if int(s["W"]) < 1:
        raise ValueError(f"rsd_s needs beam width W >= 1, got {s['W']}")
    s["W"] = int(s["W"])
    return s


RSD_S = register(Method(name="rsd_s", label="RSD-S", draft_tree=draft_stochastic_beam,
                        verify_children=recursive_rejection, params={"W": 2}, resolve=_resolve,
                        describe=lambda s: f"W={s['W']}",
                     max_nodes=lambda s: s["W"] * s["L"] + 1))
