"""RSD-S: a draft tree from Stochastic Beam Search (Kool et al. 2019) with beam width W.

Each beam item y has phi(y) (sum of draft log-probs) and a Gumbel score G(y) (root: 0, 0).
Children get G'(x) = phi(y) + log D(x|y) + Gumbel, shifted so their maximum equals G(y); the top
W over all expansions survive. Within a parent the shift is monotone, so its kept children are a
prefix of its Gumbel order: a without-replacement sample in draw order, verified by recursive
rejection sampling. A parent with no surviving child is a leaf (early truncation).
"""

import math

import torch

from ..device_graph import constant, graphed
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
    """One level of the beam on the device: rows [parent; token; alive] for draft.children, best
    first, and the survivors' phi and scores. Dead items (score -inf) have no children; so does a
    child of draft probability 0, which scores -inf."""
    child_phi = phi[:, None] + probs.double().log()
    perturbed = child_phi + gumbel(gen, probs.shape, probs.device).double()
    # where(), not a product: shift_gumbel gives NaN on a dead item's row
    shifted = torch.where((score > -math.inf)[:, None], shift_gumbel(perturbed, score), -math.inf)
    values, flat = top_k(shifted.view(-1), min(width, shifted.numel()))
    vocab = probs.shape[-1]
    return torch.stack([flat // vocab, flat % vocab, (values > -math.inf).long()]), child_phi.view(-1)[flat], values


def draft_stochastic_beam(tree, draft, settings, gen) -> None:
    probs = draft([0])
    phi = score = constant(0.0, 1, torch.float64, probs.device)
    # static shapes: W rows at each depth (dead ones -inf); the rows are in global descending
    # order, so each parent's children are proposed in their draw order
    draft.grow(beam_level, probs, (phi, score), gen, [{"width": settings["W"]}] * settings["L"])


def _resolve(s: dict) -> dict:
    if int(s["W"]) < 1:
        raise ValueError(f"rsd_s needs beam width W >= 1, got {s['W']}")
    s["W"] = int(s["W"])
    return s


RSD_S = register(Method(name="rsd_s", label="RSD-S", draft_tree=draft_stochastic_beam,
                        verify_children=recursive_rejection, params={"W": 2}, resolve=_resolve,
                        describe=lambda s: f"W={s['W']}",
                     max_nodes=lambda s: s["W"] * s["L"] + 1,
                     fixed_levels=True))
