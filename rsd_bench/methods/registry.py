"""The method registry: a method is its parameters plus two functions.

- `draft_tree(tree, draft, settings, gen)`: grow the draft tree. `draft(nodes)` runs ONE batched
  draft forward over those nodes and returns their draft distributions (float32 [len, V]); it
  also records them in `tree.draft_probs`. Nodes must be in the tree and their parents drafted.
  The first call of a block is `draft([0])` (the root). After it, a method may instead grow the
  tree a level at a time without reading anything on the host: `draft.children(rows)` with
  rows = long [3, n] on the device, [parent; token; alive], where parent indexes the previous
  level's rows (the root's level is one row, 0). It runs one draft forward over all n rows
  (dead ones included, which keeps shapes static: their parents and tokens must be valid) and
  returns their distributions [n, V]; `forward=False` for the last level, which needs none (its
  dead rows may hold anything). The target then verifies the tree in one call over the root and
  all rows, dead ones as token 0 (`forward_rows`, queued before the host reads the rows). Alive rows become nodes after
  draft_tree returns (one host read per block), proposed in row order, which must be each
  parent's draw order; rows with the same parent node and token share a node. A block uses
  one style or the other after the root. `draft.grow(level, probs, state, gen, levels)` runs
  the usual loop of children() calls for a device-only level function:
  `rows, *state = level(probs, *state, gen=gen, **levels[d])` for each level d, drafting every
  level's rows but the last; on a GPU's fast runner the whole loop is one CUDA graph (the
  level function must then suit `device_graph.graphed`: static shapes, no host reads,
  randomness through `rsd_bench.sampling` with the `gen` it gets). The graph is kept per level
  function (by identity), shapes and `levels`: a function made anew per block, such as a
  lambda, is captured anew per block; pass a module-level one and put per-level values in
  `levels`. One the graph cannot capture runs level by level, with a warning.
- `verify_children(target_p, draft_p, proposals, settings, gen)`: decide at a batch of nodes,
  one row each: target_p and draft_p are float32 [n, V]; `proposals` is a long tensor [n, k] on
  the same device holding each node's proposed child tokens in verification order, padded with
  -1 where a node has fewer than k. Return (choice, token), long tensors [n]: choice is the
  index of the accepted proposal or -1 when every proposal is rejected, and token a sample from
  the residual (read only where choice is -1). The engine calls it once per block for every
  node with proposals, reads the answers with one host synchronisation and walks from the
  root; so stay on the device (no .item() / .tolist()), and draw each row's randomness
  independently, through `rsd_bench.sampling`'s `uniform`, `gumbel` and `sample_rows` with the
  `gen` you are given: on a GPU the call is captured in a CUDA graph and `gen` is a
  `UniformPool` refilled before every replay (a verifier that cannot be captured still works,
  without the graph). The engine samples the bonus token from the target at nodes without
  proposals.

Adding a method never touches the engine loop: write the two functions and `register(Method(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..tree import DraftTree

DraftFn = Callable[[list[int]], torch.Tensor]
DraftTreeFn = Callable[[DraftTree, DraftFn, dict, torch.Generator], None]
VerifyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict, torch.Generator], tuple]


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # legend label, e.g. "RSD-S"
    draft_tree: DraftTreeFn
    verify_children: VerifyFn
    params: dict[str, Any] = field(default_factory=dict)  # parameter -> default
    # settings -> settings (fill derived values, raise ValueError on bad ones)
    resolve: Callable[[dict], dict] | None = None
    # settings -> short label of the method setting, e.g. "K=3"
    describe: Callable[[dict], str] | None = None
    uses_draft: bool = True
    # settings -> most tree nodes (root included) of one block; sizes the fast mode's graphs
    max_nodes: Callable[[dict], int] | None = None
    # draft_tree is draft([0]) then draft.grow(...) with the same level function and levels in
    # every block, and draws randomness only inside them: the engine may then refill the next
    # block's level pools before it reads the verification (the same numbers, drawn earlier)
    fixed_levels: bool = False

    def settings(self, L: int, **params) -> dict:
        """Validated settings: {"L": depth, **parameters} with defaults filled in."""
        unknown = set(params) - set(self.params)
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"method {self.name!r} has no parameter(s) {sorted(unknown)}; known: {known}")
        s = {"L": int(L), **self.params, **{k: v for k, v in params.items() if v is not None}}
        if self.uses_draft and s["L"] < 1:
            raise ValueError(f"method {self.name!r} needs draft length L >= 1, got {L}")
        if not self.uses_draft:
            s["L"] = 0
        return self.resolve(s) if self.resolve else s

    def setting_label(self, settings: dict) -> str:
        return self.describe(settings) if self.describe else ""


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
