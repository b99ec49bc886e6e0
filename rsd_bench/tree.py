"""The draft tree of one speculative block.

Node 0 is the root: the last emitted token, whose continuation is being drafted. Nodes are stored
in the order they are created (level by level), which is also the order they are flattened into
the target's verification forward. `proposals[n]` lists the child nodes offered at node n in the
order the verifier must consider them: draw order for recursive rejection sampling, chain order
(with repeats, one entry per surviving draft) for SpecTr's K-SEQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    root_token: int
    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    proposals: list[list[int]] = field(default_factory=list)
    children: list[dict[int, int]] = field(default_factory=list)  # token -> child node
    # draft distribution at a node (the one its children were drawn from), float32 [V]
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if not self.tokens:
            self._append(self.root_token, -1)

    def __len__(self) -> int:
        return len(self.tokens)

    def _append(self, token: int, parent: int) -> int:
        node = len(self.tokens)
        self.tokens.append(int(token))
        self.parent.append(parent)
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        self.proposals.append([])
        self.children.append({})
        return node

    def add_child(self, parent: int, token: int) -> int:
        """Child of `parent` carrying `token`, created if new; the proposal list is not touched."""
        node = self.children[parent].get(int(token))
        if node is None:
            node = self._append(token, parent)
            self.children[parent][int(token)] = node
        return node

    def propose(self, parent: int, token: int) -> int:
        """Add `token` as the next proposal at `parent` (creating the child if needed)."""
        node = self.add_child(parent, token)
        self.proposals[parent].append(node)
        return node

    def ancestors(self, node: int) -> list[int]:
        """Nodes from the root down to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parent[node]
        return path[::-1]

    @property
    def max_depth(self) -> int:
        return max(self.depth)
