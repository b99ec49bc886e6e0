"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): one draft chain of length L."""

from .chains import draft_chains
from .recursive_rejection import recursive_rejection
from .registry import Method, register


def draft_chain(tree, draft, settings, gen) -> None:
    draft_chains(draft, 1, settings["L"], gen)


SD = register(Method(name="sd", label="SD", draft_tree=draft_chain,
                     verify_children=recursive_rejection,
                     max_nodes=lambda s: s["L"] + 1,
                     fixed_levels=True))
