"""The engine loop: draft a tree, verify it with one target forward, walk it, keep the accepted path.

Draft trees grow through `_DraftSession`: node by node (`draft(nodes)`, host lists) or level by
level on the device (`draft.children(rows)`, built into nodes by `finish` after the method returns).
A tree grown on the device is verified by a target call over its rows (`forward_rows`), queued
before the host reads them; a tree built on the host, by a call over its nodes.

Invariants at the start of every block (seq = prompt + generated so far, n = len(seq)):
- the target's cache holds seq[:-1] once the last block's compaction has run (it is queued at
  the start of the verify phase, behind the draft); seq[-1] (the root) is fed with the tree;
- the draft's cache holds seq[:m] for some m <= n - 1; seq[m:] is fed with the first draft call.
After the walk both caches are compacted in place to the context plus the accepted path, so
rejected nodes leave no trace and nothing is recomputed.
"""

from __future__ import annotations

import functools
import gc
import logging
from dataclasses import dataclass, field

import torch

from . import device_graph
from .draft_graph import DraftLevelsGraph, NoRoom, TooWide
from .lm import ModelRunner, Stopwatch, TreeMask
from .methods import Method, get_method
from .sampling import to_probs
from .tree import DraftTree
from .verify import decide, walk


log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    pass


@dataclass
class GenerationResult:
    tokens: list[int]
    method: str
    settings: dict
    target_calls: int = 0
    draft_calls: int = 0
    tokens_per_block: list[int] = field(default_factory=list)
    depth_attempts: list[int] = field(default_factory=list)  # walk reached depth d with proposals
    depth_accepts: list[int] = field(default_factory=list)  # ... and accepted a child there
    nodes_per_call: list[int] = field(default_factory=list)  # tree nodes (root included) verified
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    overhead_seconds: float = 0.0
    stop_reason: str = ""

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def block_efficiency(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def acceptance_per_depth(self) -> list[float]:
        return [a / t if t else float("nan") for a, t in zip(self.depth_accepts, self.depth_attempts)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclass
class _Level:
    """One draft.children(...) call: rows [parent; token; alive] on the device, and where its
    draft call put them (start: cache index of row 0 relative to the session's base; None
    without a call)."""

    rows: torch.Tensor
    start: int | None = None
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # kept only for the trace


class _DraftSession:
    """Runs the batched draft forwards of one block and remembers where each node sits in the cache."""

    def __init__(self, runner: ModelRunner, seq: list[int], tree: DraftTree, vocab: int,
                 temperature: float, top_p: float | None, trace=None):
        self.runner, self.seq, self.tree, self.trace = runner, seq, tree, trace
        self.vocab, self.temperature, self.top_p = vocab, temperature, top_p
        self.base = runner.length  # m: draft cache holds seq[:m]
        self.pending = len(seq) - self.base  # seq[m:], the root last
        self.slot: dict[int, int] = {}  # node -> cache index relative to base
        self.calls = 0
        self.levels: list[_Level] = []  # children() calls, turned into tree nodes by finish()
        self._rows: torch.Tensor | None = None  # all levels' rows at once (grow's graph, or all_rows)
        self._host_rows: tuple | None = None  # (pinned copy of the rows, its copy's event): read_rows
        self.node_row: dict[int, int] = {}  # tree node -> its first row (index into all_rows)
        self.fused: DraftLevelsGraph | None = None  # the graph grow() replayed, if it did

    def __call__(self, nodes: list[int]) -> torch.Tensor:
        tree, runner, root_pos = self.tree, self.runner, len(self.seq) - 1
        if self.levels:
            raise RuntimeError("draft(nodes) after draft.children(...): a block grows by one or the other")
        if not self.slot:
            if nodes != [0]:
                raise RuntimeError("the first draft call of a block must be for the root alone: draft([0])")
            tokens = self.seq[self.base:]
            positions = list(range(self.base, len(self.seq)))
            logits = runner.forward(tokens, positions, None)[-1:]
            self.slot[0] = self.pending - 1
        else:
            missing = [n for n in nodes if n in self.slot or tree.parent[n] not in self.slot]
            if missing:
                raise RuntimeError(f"draft() got nodes already drafted or whose parent is not drafted: {missing}")
            past = runner.length
            if len(nodes) == 1 and len(self.slot) == tree.depth[nodes[0]]:
                attend = None  # a chain: everything cached is this node's context and ancestors
            else:  # context, pending tokens and the root; then each node's drafted ancestors and itself
                base, slot = self.base, self.slot
                attend = TreeMask(base + self.pending, [[base + slot[a] for a in tree.ancestors(node)[1:-1]]
                                                        + [past + i] for i, node in enumerate(nodes)])
            positions = [root_pos + tree.depth[n] for n in nodes]
            logits = runner.forward([tree.tokens[n] for n in nodes], positions, attend)
            for i, node in enumerate(nodes):
                self.slot[node] = past - self.base + i
        self.calls += 1
        if self.trace is not None:
            self.trace("draft", self.seq, tree, nodes, logits)
        probs = to_probs(logits[:, : self.vocab], self.temperature, self.top_p)
        for i, node in enumerate(nodes):
            tree.draft_probs[node] = probs[i]
        return probs

    def children(self, rows: torch.Tensor, forward: bool = True) -> torch.Tensor | None:
        """Grow the tree by one level of rows without reading anything on the host.

        rows: long [3, n] on the device, [parent; token; alive]. Row i carries token[i] as a
        child of row parent[i] of the previous level (after draft([0]), the root's level: one row, 0), and
        becomes a tree node only where alive[i] and its parent row is one; rows of the same
        parent node and token become one node (proposed once per row, in row order, which
        must be draw order). With forward, one batched draft call runs over all n rows, dead
        ones included (they keep the shapes static and are never proposed), and their draft
        distributions [n, V] are returned; the last level needs no call (forward=False).
        The nodes exist after the method returns (`finish`, one host read per block).
        """
        if not self.slot or len(self.slot) > 1:
            raise RuntimeError("draft.children(...) follows draft([0]) and no other draft(nodes) call")
        if self.levels and self.levels[-1].start is None:
            raise RuntimeError("draft.children(...) after a level drafted with forward=False")
        rows = rows.clone()  # graphed level functions reuse their outputs
        level = _Level(rows)
        if forward:
            runner, n = self.runner, rows.shape[1]
            level.start = runner.length - self.base
            depth = len(self.levels) + 1
            logits = runner.forward_children(rows[:2], [len(self.seq) - 1 + depth] * n,
                                             parent_offset=self.pending - 1 if depth == 1 else 0)
            self.calls += 1
            if self.trace is not None:
                level.logits = logits.clone()
            if logits.shape[-1] != self.vocab:
                logits = logits[:, : self.vocab]
            level.probs = to_probs(logits, self.temperature, self.top_p)
        self.levels.append(level)
        return level.probs

    def grow(self, level, probs: torch.Tensor, state: tuple, gen, levels: list[dict]) -> None:
        """Grow the tree by len(levels) levels of a device-only level function, as this loop would:

            for d, static in enumerate(levels):
                rows, *state = level(probs, *state, gen=gen, **static)
                probs = draft.children(rows, forward=d < len(levels) - 1)

        `level` must suit `device_graph.graphed` (it may be a `graphed` function): given the same
        input shapes and static arguments it returns the same shapes and reads nothing on the
        host. On a fast runner on a GPU the whole loop runs as one CUDA graph
        (draft_graph.DraftLevelsGraph), with the same random numbers as the loop.
        """
        if self.levels or len(self.slot) != 1:
            raise RuntimeError("draft.grow(...) follows draft([0]) and no other draft call")
        levels = [dict(s) for s in levels]
        fused = self._levels_graph(level, probs, state, gen, levels) if levels else None
        if fused is None:
            for depth, static in enumerate(levels, 1):
                rows, *state = level(probs, *state, gen=gen, **static)
                probs = self.children(rows, forward=depth < len(levels))
            return
        self.fused = fused
        start = self.runner.length - self.base
        rows, level_probs = fused.replay(self.runner, probs, state, gen, self.runner.length, self.pending - 1,
                                         len(self.seq))
        first = 0
        for d, width in enumerate(fused.widths):
            drafted = d < len(level_probs)
            self.levels.append(_Level(rows[:, first : first + width], start + first if drafted else None,
                                      level_probs[d] if drafted else None))
            first += width
        self.calls += len(level_probs)
        self._rows = rows

    def _levels_graph(self, level, probs, state, gen, levels):
        """The runner's DraftLevelsGraph for this call, or None where grow runs level by level:
        an eager runner, no CUDA graphs (the CPU, unless tests force the pooled path), a trace
        (it needs each level's logits), a runner that asks for it (the benchmark's synchronized
        timer), a level wider than the largest bucket, too little cache left for a first capture,
        or a level function the graph could not capture (e.g. one that reads values on the host)."""
        runner = self.runner
        if (self.trace is not None or not hasattr(runner, "children_body")
                or not getattr(runner, "fuse_draft_levels", True) or not runner.children_ready()
                or not (runner.use_graphs or device_graph.FORCE_POOLED) or not device_graph.pooled(probs.device)):
            return None
        fn = getattr(level, "fn", level)  # a `graphed` function's own body: captured into the whole
        timed = hasattr(runner, "graph_replay")
        key = (fn, tuple((t.shape, t.dtype) for t in (probs, *state)),
               tuple(tuple(sorted(s.items())) for s in levels), self.vocab, self.temperature, self.top_p, timed)
        graphs = runner.draft_graphs
        entry = graphs.get(key)
        if entry is None:
            entry = DraftLevelsGraph(fn, probs, state, levels, self.vocab, self.temperature, self.top_p, timed)
            try:
                entry.build(runner, probs, state, gen, runner.length, self.pending - 1, len(self.seq))
            except TooWide:
                entry = False
            except NoRoom:
                return None
            except Exception as err:  # e.g. a method's level function that syncs cannot be captured
                log.warning("draft levels of %s run level by level: %s", getattr(fn, "__qualname__", fn), err)
                entry = False
            graphs[key] = entry
        if entry is False:
            return None
        if runner.length + entry.reach > runner.capacity:
            return None  # level by level, where forward_children says whether it fits
        return entry

    def all_rows(self) -> torch.Tensor:
        """Every level's rows [parent; token; alive] in level order (long [3, R], on the device)."""
        if self._rows is None:
            self._rows = torch.cat([lv.rows for lv in self.levels], 1)
        return self._rows

    def call_layout(self) -> tuple[list[int], list[int]]:
        """(parent offsets [R], positions [1 + R]) of a target call over the root and all_rows
        (runner.forward_rows): a level-d row's parent is call row 1 + (first row of level d-1)
        + its parent; level 0's parent is the root, call row 0."""
        root_pos = len(self.seq) - 1
        offsets, positions, above, first = [], [root_pos], 0, 0  # above: call row of the level above's row 0
        for d, level in enumerate(self.levels):
            width = level.rows.shape[1]
            offsets += [above] * width
            positions += [root_pos + 1 + d] * width
            above, first = 1 + first, first + width
        return offsets, positions

    def read_rows(self) -> None:
        """Start copying all_rows to the host. finish() then waits for this copy alone, not for
        GPU work queued after it (the target call), as a plain read would."""
        rows = self.all_rows()
        if rows.device.type != "cuda":
            return
        pinned = _PINNED.get(tuple(rows.shape))
        if pinned is None:
            pinned = _PINNED[tuple(rows.shape)] = (torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True),
                                                   torch.cuda.Event())
        host, done = pinned
        host.copy_(rows, non_blocking=True)  # the last block's finish() has read it
        done.record(_stream(rows.device))
        self._host_rows = pinned

    def call_rows(self) -> list[int]:
        """Each tree node's row in the target call over the root and all_rows (after finish)."""
        return [0] + [1 + self.node_row[node] for node in range(1, len(self.tree))]

    def finish(self) -> None:
        """Turn the children() levels into tree nodes: the block's one host read of the draft."""
        if not self.levels:
            return
        tree = self.tree
        if self._host_rows is not None:
            host, done = self._host_rows
            done.synchronize()
        else:
            host = self.all_rows()
        parent, tokens, alive = host.tolist()
        row_node: list[int | None] = [0]  # the root's level
        first = 0
        for level in self.levels:
            nodes: list[int | None] = []
            probs = level.probs.unbind(0) if level.probs is not None else None  # one call, not one per row
            for i in range(first, first + level.rows.shape[1]):
                above = row_node[parent[i]]
                if not alive[i] or above is None:
                    nodes.append(None)
                    continue
                node = tree.propose(above, tokens[i])
                nodes.append(node)
                self.node_row.setdefault(node, i)
                if level.start is not None:  # the first row of a node holds its cache entry and distribution
                    self.slot.setdefault(node, level.start + i - first)
                    tree.draft_probs.setdefault(node, probs[i - first])
            if self.trace is not None and level.logits is not None:
                live = [i for i, node in enumerate(nodes) if node is not None]
                self.trace("draft", self.seq, tree, [nodes[i] for i in live], level.logits[live])
            row_node, first = nodes, first + level.rows.shape[1]

    def keep(self, path: list[int]) -> None:
        drafted = [self.slot[a] for a in path if a in self.slot]
        self.runner.keep(self.base, list(range(self.pending)) + drafted)

    def prefill_next(self, gen):
        """A before_read for the verification: refill the pools of this block's levels graph for
        the next block (DraftLevelsGraph.prefill), or None where the next block might not replay
        it. It would not if the cache could lack room then: the next block's levels start at most
        one entry per level plus one past this block's root (the accepted path and the token after).
        Only for methods whose every block replays the same graph (Method.fixed_levels)."""
        fused = self.fused
        if fused is None or self.base + self.pending + len(fused.widths) + 1 + fused.reach > self.runner.capacity:
            return None
        return functools.partial(fused.prefill, gen)


_PINNED: dict[tuple, tuple] = {}  # (host buffer, its copy's event) of read_rows, per shape
_STAGING: dict = {}  # device -> (pinned long buffer, CopyGuard of its last copy): _indices


def _indices(values: list[int], device: torch.device) -> torch.Tensor:
    """values as a long tensor on device without waiting for the GPU: a copy from pageable host
    memory synchronizes the stream, here with the target call still running."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    buf, copied = _STAGING.get(device, (None, None))
    if buf is None or buf.numel() < len(values):
        buf = torch.empty(max(256, len(values)), dtype=torch.long, pin_memory=True)
        copied = device_graph.CopyGuard(device)
    else:
        copied.wait()  # its last copy has left
    buf.numpy()[: len(values)] = values
    out = buf[: len(values)].to(device, non_blocking=True)
    copied.record(_stream(device))
    _STAGING[device] = (buf, copied)
    return out


def _stream(device: torch.device):
    """The current stream of `device` (an event's record() alone takes the current device's)."""
    return torch.cuda.current_stream(device)


def _takes_rows(target, n: int) -> bool:
    """Whether the target can take a call of n tree rows (forward_rows) now: a runner without it,
    or a fast runner whose largest bucket or free cache is too small (a wide tree, many of whose
    rows may be dead), gets the call over the tree's nodes instead."""
    takes = getattr(target, "takes_rows", None)
    return takes is not None and takes(n)


def _without_gc(fn):
    """Run fn with Python's cyclic garbage collector off, as timeit does while timing.

    Once Dynamo and Inductor have compiled something, the process holds ~0.5 M objects and one
    full collection takes 0.2-0.4 s: triggered mid-decode, it was timed as decoding (an H200
    run measured an RSD-C decode at 0.66 s instead of 0.38). The loop makes no reference
    cycles of its own; collections resume, and catch up, when the call returns.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@_without_gc
def generate(target: ModelRunner, draft: ModelRunner | None, prompt_ids: list[int],
             method: str | Method = "sd", L: int = 3, *, vocab_size: int, temperature: float = 1.0,
             top_p: float | None = None, max_new_tokens: int = 128, seed: int = 0,
             eos_token_ids: set[int] | list[int] | None = None, context_length: int | None = None,
             timing: bool = True, trace=None, **params) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids with a method; see README for the API.

    trace, if given, is called as trace(model, seq, tree, nodes, logits) after every draft and
    target forward of a block (model "draft" or "target"; seq = context whose last token is the
    tree root; logits [len(nodes), V] at those nodes). Tests use it to check the cache.
    """
    method = get_method(method) if isinstance(method, str) else method
    settings = method.settings(L, **params)
    depth = settings["L"]
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("empty prompt: at least one token (e.g. BOS) is needed")
    if context_length is not None and len(prompt) + max_new_tokens + depth > context_length:
        raise PromptTooLongError(
            f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} + draft length {depth} "
            f"exceeds the model context of {context_length} tokens; shorten the prompt (fewer "
            f"examples' words / a shorter template) or lower max_new_tokens")
    if method.uses_draft and draft is None:
        raise ValueError(f"method {method.name!r} needs a draft model; the pair has none")
    if method.uses_draft and draft is target:
        raise ValueError("target and draft must be separate runners (each owns a KV cache); "
                         "wrap the model twice to draft with the target itself")
    eos = set(eos_token_ids or ())
    device = target.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    capacity = len(prompt) + max_new_tokens + 64
    runners = [target] + ([draft] if method.uses_draft else [])
    for r in runners:
        r.reset(capacity)
    result = GenerationResult(tokens=[], method=method.name, settings=settings)
    result.depth_attempts = [0] * depth
    result.depth_accepts = [0] * depth

    watch = Stopwatch(device, enabled=timing)
    watch.switch("prefill")
    if len(prompt) > 1:
        for r in runners:
            r.forward(prompt[:-1], list(range(len(prompt) - 1)), None)
    watch.switch(None)
    seq = list(prompt)
    new: list[int] = []
    # Right after the verification read the GPU idles until the host has queued the next draft
    # call, and every CUDA call there costs the host 10-30 us on the GPU machines. So the target's
    # compaction waits until the next draft is queued (keep_target), and the last block's tree
    # and session are freed only once the next target call is (held).
    keep_target: tuple | None = None
    held = None

    while len(new) < max_new_tokens:
        tree = DraftTree(seq[-1])
        session = None
        if method.uses_draft:
            watch.switch("draft")
            session = _DraftSession(draft, seq, tree, vocab_size, temperature, top_p, trace)
            method.draft_tree(tree, session, settings, gen)
            result.draft_calls += session.calls

        watch.switch("verify")
        if keep_target is not None:
            target.keep(*keep_target)
            keep_target = None
        root_pos = len(seq) - 1
        at = None  # each node's row in the target call, where that call is over the draft's rows
        if (session is not None and session.levels and getattr(target, "target_from_rows", True)  # False: A/B
                and _takes_rows(target, 1 + session.all_rows().shape[1])):
            # The target call goes from the draft's rows on the device, queued behind the draft
            # before the host reads them: the host builds the tree while the target runs, instead
            # of the GPU waiting for the host. Dead and repeated rows ride along (never read);
            # dead rows go in as token 0 under their level's first parent, whatever a method left
            # there (a last level's dead rows never met a model before).
            session.read_rows()
            offsets, positions = session.call_layout()
            rows = session.all_rows()
            rows = torch.where(rows[2:] != 0, rows[:2], 0)
            logits = target.forward_rows(seq[-1], rows, offsets, positions)
            held = None
            session.finish()
            at = session.call_rows()
            logits = logits[: len(at)] if at == list(range(len(at))) else logits.index_select(0, _indices(at, device))
        else:
            if session is not None:
                session.finish()
            # the target's cache holds seq[:-1]: every node sees it, then its ancestors and itself
            mask = TreeMask(root_pos, [[root_pos + a for a in tree.ancestors(i)] for i in range(len(tree))])
            logits = target.forward(tree.tokens, [root_pos + d for d in tree.depth], mask)
            held = None
        result.target_calls += 1
        result.nodes_per_call.append(len(tree))
        if trace is not None:
            trace("target", seq, tree, list(range(len(tree))), logits)

        watch.switch("overhead")
        choice, token = decide(method.verify_children, tree, logits[:, :vocab_size], settings, gen,
                               temperature, top_p,
                               before_read=session.prefill_next(gen) if session is not None and method.fixed_levels
                               else None)
        w = walk(tree, choice, token)
        path, last = w.path, w.last
        for d in w.depths_tried:
            result.depth_attempts[d] += 1
        for d in range(len(path)):
            result.depth_accepts[d] += 1

        keep_target = (root_pos, [0] + path if at is None else [at[a] for a in [0] + path])
        if session is not None:
            session.keep(path)
        held = (tree, session, logits)
        emitted = [tree.tokens[a] for a in path] + [int(last)]
        emitted = emitted[: max_new_tokens - len(new)]
        hit = next((i for i, t in enumerate(emitted) if t in eos), None)
        if hit is not None:
            emitted = emitted[: hit + 1]
        new += emitted
        seq += emitted
        result.tokens_per_block.append(len(emitted))
        if hit is not None:
            result.stop_reason = "eos"
            break
    else:
        result.stop_reason = "max_new_tokens"
    if keep_target is not None:  # the caches hold the sequence when generate returns
        target.keep(*keep_target)
    watch.switch(None)

    result.tokens = new
    t = watch.totals
    result.prefill_seconds = t.get("prefill", 0.0)
    result.draft_seconds = t.get("draft", 0.0)
    result.verify_seconds = t.get("verify", 0.0)
    result.overhead_seconds = t.get("overhead", 0.0)
    result.decode_seconds = result.draft_seconds + result.verify_seconds + result.overhead_seconds
    return result
