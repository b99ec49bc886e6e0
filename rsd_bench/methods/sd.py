"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): one draft chain of length L."""

from ..sampling import sample
from .recursive_rejection import recursive_rejection
from .registry import Method, register


def draft_chain(tree, draft, settings, gen) -> None:
    node = 0
    for _ in range(settings["L"]):
        probs = draft([node])[0]
        node = tree.propose(node, sample(probs, gen))


SD = register(Method(name="sd", label="SD", draft_tree=draft_chain,
                     verify_children=recursive_rejection,
                     max_nodes=lambda s: s["L"] + 1))
