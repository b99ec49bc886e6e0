"""SpecTr (Sun et al. 2023): K i.i.d. draft chains merged into a prefix tree, verified by K-SEQ.

A node's proposals are the next tokens of the chains passing through it, in chain order, with
repeats: they are i.i.d. draws from the draft at that node, as K-SEQ requires. Chains carrying
the accepted token are exactly those passing through the accepted child.
"""

from .chains import draft_chains
from .kseq import kseq_verify
from .registry import Method, register


def draft_k_chains(tree, draft, settings, gen) -> None:
    draft_chains(draft, settings["K"], settings["L"], gen)


def _resolve(s: dict) -> dict:
    if int(s["K"]) < 1:
        raise ValueError(f"spectr needs K >= 1 draft chains, got {s['K']}")
    s["K"] = int(s["K"])
    return s


SPECTR = register(Method(name="spectr", label="SpecTr", draft_tree=draft_k_chains,
                         verify_children=kseq_verify, params={"K": 2}, resolve=_resolve,
                         describe=lambda s: f"K={s['K']}",
                     max_nodes=lambda s: s["K"] * s["L"] + 1,
                     fixed_levels=True))
