"""The one forward implementation: every method, the AR baseline included, calls models through it.

`ModelRunner` wraps a Hugging Face causal LM (or anything with the same call signature) and a
`TreeKVCache`. A forward takes new tokens, their explicit position ids and a boolean attention
pattern over [cached entries + new tokens]; it returns float32 logits. Tree attention is a 4-D
float mask passed as `attention_mask`, which transformers uses as-is.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import NamedTuple

import torch

from .device_graph import SetupClock
from .kv_cache import TreeKVCache


def _cache_keyword() -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); 5.17 only knows the old name.
    try:
        from transformers import LlamaForCausalLM

        if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters:
            return "cache"
    except Exception:  # pragma: no cover - very old/new layouts
        pass
    return "past_key_values"


CACHE_KEYWORD = _cache_keyword()


def count_parameters(model: torch.nn.Module) -> int:
    fn = getattr(model, "num_parameters", None)
    if callable(fn):
        return int(fn())
    return sum(p.numel() for p in model.parameters())


def model_context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TreeMask(NamedTuple):
    """An attention pattern as lists, for callers that know it row by row (tree calls): every row
    sees the cache columns below `prefix`, and row i also the absolute columns in rows[i]
    (its cached ancestors past the prefix and its own new position). Cheaper on the host than
    a dense [n, length + n] bool tensor, which the fast runner would only turn back into bits."""

    prefix: int
    rows: list[list[int]]

    def dense(self, n: int, width: int) -> torch.Tensor:
        """bool [n, width] over cache columns 0 .. width - 1."""
        attend = torch.zeros(n, width, dtype=torch.bool)
        attend[:, : self.prefix] = True
        cols = [(i, c) for i, row in enumerate(self.rows) for c in row]
        if cols:
            r, c = zip(*cols)
            attend[list(r), list(c)] = True
        return attend


def row_ancestors(parent: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """bool [n, n]: row i sees row j where j is i or one of its ancestors; parent: long [n], each
    row's parent row (a root's, and a padded row's, is itself); depth: the most ancestors a row
    has (default n - 1). Pointer jumping: ceil(log2 depth) steps of three kernels, no host read,
    so a CUDA graph can hold it."""
    n = parent.shape[0]
    depth = n - 1 if depth is None else depth
    rows = torch.arange(n, device=parent.device)
    seen = (rows[:, None] == rows) | (parent[:, None] == rows)  # itself and its parent
    jump = parent
    for _ in range(max(depth - 1, 0).bit_length()):  # after step k: the ancestors up to 2^k up
        seen = seen | seen.index_select(0, jump)
        jump = jump.index_select(0, jump)
    return seen


def rows_call(root: int, rows: torch.Tensor, parent_offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [1 + R], parent rows [1 + R]) on rows' device of a tree call given as a root and
    R rows [parent; token] whose row i is a child of call row parent_offsets[i] + parent[i]."""
    dev = rows.device
    offsets = torch.tensor(parent_offsets, dtype=torch.long, device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    ids = torch.cat([zero + int(root), rows[1]])
    return ids, torch.cat([zero, rows[0] + offsets])


class ModelRunner:
    """A model plus its KV cache; `length` is the number of committed cache entries."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None):
        self.model = model
        try:
            param = next(model.parameters())
            self.device, self.dtype = param.device, param.dtype
        except StopIteration:
            self.device, self.dtype = torch.device("cpu"), torch.float32
        if not torch.is_floating_point(torch.empty((), dtype=self.dtype)):
            self.dtype = torch.float32
        self.vocab_size = vocab_size
        self.cache = TreeKVCache(0)
        self.calls = 0
        self._last_attend: torch.Tensor | None = None  # the last call's rows, for forward_children

    @property
    def length(self) -> int:
        return self.cache.length

    def reset(self, capacity: int) -> None:
        if self.cache.capacity < capacity:  # reuse the buffers across examples when big enough
            self.cache = TreeKVCache(capacity)
        self.cache.reset()
        self.calls = 0
        self._last_attend = None

    @torch.no_grad()
    def forward(self, tokens, positions, attend: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens through the model; return float32 logits [n, V].

        attend: bool [n, n] (pattern among the new tokens; every cached entry is visible),
        bool [n, length + n] (full pattern, for drafts that must hide cached sibling nodes), or
        the same as a TreeMask; None means causal.
        """
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
        pos = torch.as_tensor(positions, dtype=torch.long, device=self.device).view(1, -1)
        n, past = ids.shape[1], self.cache.length
        if isinstance(attend, TreeMask):
            attend = attend.dense(n, past + n)
        if attend is None:
            attend = torch.ones(n, n, dtype=torch.bool).tril_()
        attend = attend.to(self.device)
        if attend.shape[1] == n and past:
            attend = torch.cat([torch.ones(n, past, dtype=torch.bool, device=self.device), attend], 1)
        self._last_attend = attend
        mask = torch.zeros(1, 1, n, past + n, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~attend.view(1, 1, n, past + n), torch.finfo(self.dtype).min)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                         **{CACHE_KEYWORD: self.cache})
        self.cache.commit(n)
        self.calls += 1
        logits = out.logits[0]
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        return logits.float()

    @torch.no_grad()
    def forward_children(self, rows: torch.Tensor, positions: list[int], parent_offset: int = 0) -> torch.Tensor:
        """A call of tree rows given on the device: rows = [parent; token] (long [2, n]); row i
        is a child of row parent_offset + parent[i] of the previous call: it sees what that row
        saw, that row, and itself. Nothing is read on the host, so a draft tree can grow level
        by level without a synchronisation (see engine._DraftSession.children)."""
        prev = self._last_attend
        if prev is None:
            raise RuntimeError("forward_children follows a forward of the same runner (none since the "
                               "last reset or keep)")
        n = len(positions)
        seen = prev[parent_offset:].index_select(0, rows[0].to(prev.device))  # [n, length]
        own = torch.eye(n, dtype=torch.bool, device=prev.device)
        return self.forward(rows[1], positions, torch.cat([seen, own], 1))

    def takes_rows(self, n: int) -> bool:
        """Whether forward_rows takes n rows now (the eager cache grows as needed)."""
        return True

    @torch.no_grad()
    def forward_rows(self, root: int, rows: torch.Tensor, parent_offsets: list[int], positions: list[int]) -> torch.Tensor:
        """A tree call given on the device: call row 0 is `root`, call row 1 + i is rows[1, i]
        (rows = [parent; token], long [2, R]), a child of call row parent_offsets[i] + rows[0, i].
        Every row sees the whole cache, its ancestors and itself; positions: the 1 + R rows'.
        Nothing is read on the host, so a target call can be queued right behind the draft that
        built the rows (engine: before the host reads them). Returns float logits [1 + R, V]."""
        ids, parent = rows_call(root, rows, parent_offsets)
        return self.forward(ids, positions, row_ancestors(parent, max(positions) - positions[0]))

    def keep(self, start: int, rel_indices: list[int]) -> None:
        """Keep cache entries [0, start) and start+rel_indices; see TreeKVCache.keep."""
        self._last_attend = None  # its columns no longer match the cache
        self.cache.keep(start, rel_indices)


_TIMING_EVENTS: dict[int, list] = {}  # device index -> timing events Stopwatch has read, free for reuse


class Stopwatch:
    """Wall time per phase (draft / verify / overhead), less the time spent building CUDA graphs
    meanwhile (device_graph.SetupClock).

    On a GPU a phase switch records a CUDA event on the stream, and a phase's time is the
    GPU-timeline time between its events (any wait of the GPU for the host included). Nothing
    synchronizes at a switch, so the host prepares the next phase (e.g. the verification's inputs)
    while the GPU still runs the last one; a synchronization at every switch (three per block)
    left the GPU idle while the host did that work. The events are read once, at `totals`.
    RSD_BENCH_PHASE_SYNC=1 restores the synchronized wall clock (for comparisons). On the CPU,
    where every op finishes before the next, it is wall time.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.events = (device.type == "cuda"
                       and os.environ.get("RSD_BENCH_PHASE_SYNC", "0").strip().lower() in ("0", "", "false", "no", "off"))
        # the stream phases run on, looked up once: current_stream() costs the host several us
        # per call, and a block has three switches (a generate call does not change streams)
        self._stream = torch.cuda.current_stream(device) if self.events else None
        self._free = _TIMING_EVENTS.setdefault(self._stream.device_index, []) if self.events else []
        self._marks: list[tuple] = []  # (phase started, event or perf_counter time, SetupClock.seconds)
        self._totals: dict[str, float] = {}

    def switch(self, phase: str | None) -> None:
        if not self.enabled:
            return
        if self.events:
            # events are reused once read (`totals`): creating one costs the host a CUDA call, and
            # the switch to "draft" comes right after the verification read, while the GPU idles
            mark = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
            mark.record(self._stream)
        else:
            synchronize(self.device)
            mark = time.perf_counter()
        self._marks.append((phase, mark, SetupClock.seconds))

    @property
    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (reads the events: waits for the GPU to reach the last one)."""
        marks = self._marks
        if self.events and marks:
            marks[-1][1].synchronize()
        for (phase, start, setup0), (_, end, setup1) in zip(marks, marks[1:]):
            if phase is None:
                continue
            elapsed = start.elapsed_time(end) / 1e3 if self.events else end - start
            self._totals[phase] = self._totals.get(phase, 0.0) + elapsed - (setup1 - setup0)
        if self.events:
            self._free.extend(mark for _, mark, _ in marks[:-1])
        self._marks = marks[-1:]
        return self._totals
