"""Verification of a whole draft tree with one host synchronisation.

The method's verifier decides every node with proposals at once, and a bonus token is drawn from
the target at every node; the walk from the root then only reads host lists. Deciding nodes the
walk never reaches costs a little GPU work, while a host synchronisation per visited node (the
walk's old shape) cost more than the whole verification on a GPU. Each node's decision uses its
own random draws, so the nodes on the walked path are decided exactly as one at a time would be.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .device_graph import UniformPool, capture, caught_up, pooled
from .sampling import sample_rows, to_probs
from .tree import DraftTree

log = logging.getLogger(__name__)


@dataclass
class Walk:
    path: list[int]  # accepted nodes from the root down, root excluded
    last: int  # the token after the path: a residual sample, or the bonus token at a leaf
    depths_tried: list[int]  # depths at which the walk met proposals


def decide(verify_children, tree: DraftTree, logits: torch.Tensor, settings: dict, gen: torch.Generator,
           temperature: float = 1.0, top_p: float | None = None, before_read=None) -> tuple[list[int], list[int]]:
    """(choice, token) per tree node as host lists: choice is the accepted proposal's index or
    -1 (all rejected, or a leaf); token is the residual sample where all were rejected and the
    target's bonus token at a leaf. logits: the target's [len(tree), V] at the tree's nodes.

    On a GPU the device work runs as a CUDA graph per (padded) tree shape (see GraphedDecide);
    a verifier that cannot be captured (one that reads values on the host, or draws randomness
    other than through rsd_bench.sampling) falls back to the plain path, once, with a warning.
    before_read(), if given, runs after the verification has drawn its random numbers and its
    work is queued, before the host waits for the answers.
    """
    internal = [i for i in range(len(tree)) if tree.proposals[i]]
    if pooled(logits.device):
        k = max((len(tree.proposals[i]) for i in internal), default=0)
        key = (logits.device, verify_children, _bucket(len(tree)), _bucket(len(internal)) if internal else 0, k,
               logits.shape[1], float(temperature), top_p, repr(sorted(settings.items())))
        graphed = _GRAPHS.get(key)
        if graphed is None:
            try:
                graphed = GraphedDecide(verify_children, *key[2:6], settings, temperature, top_p, logits.device)
            except Exception as err:  # the verifier cannot run inside a graph: use the plain path
                log.warning("verification of %s runs without a CUDA graph: %s", verify_children, err)
                graphed = False
            _GRAPHS[key] = graphed
        if graphed:
            return graphed(tree, internal, logits, gen, before_read)
    return _decide_plain(verify_children, tree, internal, to_probs(logits, temperature, top_p), settings, gen,
                         before_read)


def _read(out: torch.Tensor, before_read) -> list[int]:
    """The block's one synchronisation: out as a host list, before_read() first."""
    if before_read is not None:
        before_read()
    values = out.tolist()
    caught_up(out.device)  # every copy queued before is done (CopyGuard)
    return values


def _decide_plain(verify_children, tree, internal, target_probs, settings, gen, before_read=None):
    n = len(tree)
    if not internal:
        return [-1] * n, _read(sample_rows(target_probs, gen), before_read)
    m, k = len(internal), max(len(tree.proposals[i]) for i in internal)
    host = torch.tensor(_flat_inputs(tree, internal, m, k, pad_row=0), dtype=torch.long)  # one copy
    rows, proposals = host.to(target_probs.device, non_blocking=True).split([m, m * k])
    both = _read(_decisions(verify_children, target_probs, rows, torch.stack([tree.draft_probs[i] for i in internal]),
                            proposals.view(m, k), settings, gen), before_read)
    return both[:n], both[n:]


def _decisions(verify_children, probs, rows, draft, proposals, settings, gen) -> torch.Tensor:
    """[choice; token] for every row of probs: bonus draws everywhere, the verifier's answers at
    `rows` (the nodes with proposals, whose draft rows and proposals follow in order)."""
    token = sample_rows(probs, gen)  # bonus tokens, replaced at nodes with proposals
    choice = torch.full((probs.shape[0],), -1, dtype=torch.long, device=probs.device)
    choice_i, token_i = verify_children(probs.index_select(0, rows), draft, proposals, settings, gen)
    return torch.cat([choice.index_copy(0, rows, choice_i.long()), token.index_copy(0, rows, token_i.long())])


def _flat_inputs(tree, internal, rows: int, k: int, pad_row: int) -> list[int]:
    """[row indices (rows), proposal tokens (rows x k)]: real nodes first, -1 padded."""
    flat = list(internal) + [pad_row] * (rows - len(internal))
    for i in internal:
        flat += [tree.tokens[c] for c in tree.proposals[i]] + [-1] * (k - len(tree.proposals[i]))
    return flat + [-1] * (k * (rows - len(internal)))


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_GRAPHS: dict[tuple, "GraphedDecide | bool"] = {}


class GraphedDecide:
    """`to_probs` + bonus draws + the verifier + scattering the answers, for one padded shape.

    Static inputs: logits [nodes + 1, V] (row `nodes` is a dummy that padded verifier rows point
    at), the draft distributions [rows, V], and one int buffer of row indices and -1 padded
    proposals [rows, k]. Randomness comes from a UniformPool refilled from the example's
    generator before each replay, so every block gets fresh numbers and the result is the
    plain path's in distribution. A replay costs ~5 launches and one read, against ~40 launches
    of the plain path at ~10 us each.
    """

    def __init__(self, verify_children, nodes: int, rows: int, k: int, vocab: int, settings: dict,
                 temperature: float, top_p: float | None, device: torch.device):
        self.verify_children, self.nodes, self.rows, self.k = verify_children, nodes, rows, k
        self.settings, self.temperature, self.top_p = settings, temperature, top_p
        self.logits = torch.zeros(nodes + 1, vocab, device=device)
        self.draft = torch.full((max(rows, 1), vocab), 1.0 / vocab, device=device)
        self.ints = torch.zeros(rows * (1 + k), dtype=torch.long, device=device)
        self.pool = UniformPool(device)
        self.host_ints = torch.zeros(rows * (1 + k), dtype=torch.long, pin_memory=device.type == "cuda")
        self.graph, self.out = capture(self.body, device, self.pool)

    def body(self) -> torch.Tensor:
        self.pool.pos = 0
        probs = to_probs(self.logits, self.temperature, self.top_p)
        if not self.rows:
            return sample_rows(probs, self.pool)
        rows, proposals = self.ints.split([self.rows, self.rows * self.k])
        return _decisions(self.verify_children, probs, rows, self.draft, proposals.view(self.rows, self.k),
                          self.settings, self.pool)

    def __call__(self, tree: DraftTree, internal: list[int], logits: torch.Tensor, gen,
                 before_read=None) -> tuple[list, list]:
        n, m = len(tree), len(internal)
        self.pool.refill(gen)
        self.logits[:n].copy_(logits)
        if m:
            torch.stack([tree.draft_probs[i] for i in internal], out=self.draft[:m])
            self.host_ints.copy_(torch.tensor(_flat_inputs(tree, internal, self.rows, self.k, pad_row=self.nodes)))
            self.ints.copy_(self.host_ints, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:  # FORCE_POOLED on the CPU
            out = self.body()
        both = _read(out, before_read)
        if not self.rows:  # bonus tokens only
            return [-1] * n, both[:n]
        return both[:n], both[self.nodes + 1 : self.nodes + 1 + n]  # rows: nodes and the dummy


def walk(tree: DraftTree, choice: list[int], token: list[int]) -> Walk:
    """Follow the accepted proposals from the root until a rejection or a leaf."""
    node, path, tried = 0, [], []
    while tree.proposals[node]:
        tried.append(tree.depth[node])
        if choice[node] < 0:
            break
        node = tree.proposals[node][choice[node]]
        path.append(node)
    return Walk(path=path, last=token[node], depths_tried=tried)
