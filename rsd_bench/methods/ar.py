"""Autoregressive baseline: no draft, the tree is the root alone, the engine samples from T."""

from .recursive_rejection import recursive_rejection
from .registry import Method, register


def draft_nothing(tree, draft, settings, gen) -> None:
    return None


AR = register(Method(name="ar", label="AR", draft_tree=draft_nothing,
                     verify_children=recursive_rejection, uses_draft=False,
                     max_nodes=lambda s: 1))
