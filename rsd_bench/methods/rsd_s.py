"""RSD-S: a draft tree from Stochastic Beam Search (Kool et al. 2019) with beam width W.

Each beam item y has phi(y) (sum of draft log-probs) and a Gumbel score G(y) (root: 0, 0).
Children get G'(x) = phi(y) + log D(x|y) + Gumbel, shifted so their maximum equals G(y); the top
W over all expansions survive. Within a parent the shift is monotone, so its kept children are a
prefix of its Gumbel order: a without-replacement sample in draw order, verified by recursive
rejection sampling. A parent with no surviving child is a leaf (early truncation).
"""

import math

import torch

from ..device_graph import graphed
from ..sampling import gumbel, row_max, top_k
from .recursive_rejection import recursive_rejection
from .registry import Method, register


def shift_gumbel(perturbed: torch.Tensor, target_max: torch.Tensor) -> torch.Tensor:
    """Shift rows of Gumbel-perturbed scores so each row's maximum becomes target_max.

    Stable form of -log(exp(-T) - exp(-Z) + exp(-G')) (Kool et al. 2019, appendix B).
    """
    z = row_max(perturbed)[0][..., None]
    t = target_max.unsqueeze(-1)
    u = t - perturbed + torch.log1p(-torch.exp(perturbed - z))
    return t - u.clamp_min(0.0) - torch.log1p(torch.exp(-u.abs()))


@graphed
def beam_level(probs: torch.Tensor, phi: torch.Tensor, score: torch.Tensor, gen, width: int):
    """One level of the beam on the device: (top scores, their flat indices into [items, V], the
    survivors' phi, and [scores; indices] stacked for one host read)."""
    child_phi = phi[:, None] + probs.double().log()
    perturbed = child_phi + gumbel(gen, probs.shape, probs.device).double()
    shifted = shift_gumbel(perturbed, score)
    values, flat = top_k(shifted.view(-1), min(width, shifted.numel()))
    return values, flat, child_phi.view(-1)[flat], torch.stack([values, flat.double()])


def draft_stochastic_beam(tree, draft, settings, gen) -> None:
    width = settings["W"]
    frontier = [0]
    phi = score = None  # per beam item, float64 on the draft's device
    for _ in range(settings["L"]):
        probs = draft(frontier)
        if phi is None:
            phi = score = torch.zeros(1, dtype=torch.float64, device=probs.device)
        vocab = probs.shape[-1]
        values, flat, phi, both = beam_level(probs, phi, score, gen=gen, width=width)
        # one host read per level (flat indices < W * V are exact in float64)
        kept = [(i, int(f)) for i, (v, f) in enumerate(zip(*both.tolist())) if v > -math.inf]
        score = values
        if len(kept) < len(values):  # children of zero draft probability never survive
            idx = torch.tensor([i for i, _ in kept], dtype=torch.long, device=probs.device)
            phi, score = phi[idx], values[idx]
        # global descending order => each parent's children are proposed in their draw order
        frontier = [tree.propose(frontier[f // vocab], f % vocab) for _, f in kept]


def _resolve(s: dict) -> dict:
    if int(s["W"]) < 1:
        raise ValueError(f"rsd_s needs beam width W >= 1, got {s['W']}")
    s["W"] = int(s["W"])
    return s


RSD_S = register(Method(name="rsd_s", label="RSD-S", draft_tree=draft_stochastic_beam,
                        verify_children=recursive_rejection, params={"W": 2}, resolve=_resolve,
                        describe=lambda s: f"W={s['W']}",
                     max_nodes=lambda s: s["W"] * s["L"] + 1))
