"""A block's draft levels as one CUDA graph: level function, draft forward and softmax, L times.

After draft([0]) the built-in methods grow their trees a level at a time on the device
(`draft.grow`). Run level by level, each level costs the host about ten launches: the pool
refill, input copies and replay of the level function's graph, then the rows copy, input copies
and replay of the draft's children graph, then the softmax. On the GPU machines that is about
the GPU time of a small draft's level, so the GPU waited on the host. Captured whole, a block's
draft levels are one replay, after L pool refills and three small copies.

Randomness: level d draws from its own UniformPool. The pools are refilled from the method's
generator in level order before the replay. The level-by-level path draws the same numbers in
the same order, because each level's `graphed` function refills its own pool before it runs. So
both paths give the same tokens from the same seed, and tests compare them.
"""

from __future__ import annotations

import logging

import torch

from .device_graph import CopyGuard, SetupClock, UniformPool, capturing, fuse, is_constant, no_host_sync, warming_up
from .sampling import to_probs

log = logging.getLogger(__name__)


class TooWide(ValueError):
    """A level has more rows than the runner's largest bucket: it runs level by level."""


class NoRoom(ValueError):
    """The cache cannot take this block's levels now (a first build only): level by level this
    time, where forward_children says whether they fit."""


def _level_call(fn, static: dict):
    def call(probs, *state, gen):
        return fn(probs, *state, gen=gen, **static)

    return call


class DraftLevelsGraph:
    """The draft levels of one (level function, input shapes, per-level arguments) on one runner.

    The runner is passed to build() and replay(), not kept: a session may reach the runner through
    a proxy (the benchmark's ForwardEvents, new for each run) that must see this replay's spans.

    Level d runs `rows, *state = fn(probs, *state, gen=pool_d, **levels[d])`; every level but the
    last then runs the draft over its rows (`runner.children_body`) and turns the logits into
    probabilities for the next. Built at first use from the block at hand: its warm-ups write
    the cache entries the replay then writes again, and restore the row patterns they change.
    On the CPU (tests, with device_graph.FORCE_POOLED) the same body runs without a graph.
    """

    def __init__(self, fn, probs: torch.Tensor, state: tuple, levels: list[dict], vocab: int,
                 temperature: float, top_p: float | None, timed: bool):
        self.device = probs.device
        self.vocab, self.temperature, self.top_p = vocab, temperature, top_p
        self.probs_in = probs.clone()
        self.state_in = [s.clone() for s in state]
        self._state_seen: list | None = [None] * len(state)  # the tensors last copied in (None: always copy)
        self.pools = [UniformPool(self.device) for _ in levels]
        self.calls = [_level_call(fn, static) for static in levels]
        self.widths: list[int] | None = None  # rows per level, known after the first (sizing) run
        self.reach = 0  # cache entries past the committed length that a replay writes (padded buckets)
        cuda = self.device.type == "cuda"
        # [cache length, parent offset of level 1, position of level 1]; level d adds to them
        self.ints = torch.zeros(3, dtype=torch.long, device=self.device)
        self._pinned = torch.zeros(3, dtype=torch.long, pin_memory=cuda)
        self._pinned_np = self._pinned.numpy()
        self._copied = CopyGuard(self.device)
        self._filled_by = None  # the generator prefill() drew this replay's numbers from, if any
        # timed (the benchmark's GPU-timeline proxy): events around each level's draft forward,
        # recorded inside the graph; the runner reads them (graph_replay) before they are reused
        ext = dict(enable_timing=True, external=True)
        self.spans = ([(torch.cuda.Event(**ext), torch.cuda.Event(**ext)) for _ in levels[1:]]
                      if timed and cuda else [])
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None
        self._built_on: torch.Tensor | None = None

    @torch.no_grad()
    def _body(self, runner):
        probs, state = self.probs_in, self.state_in
        rows_out, probs_out, widths, done = [], [], [], 0
        last = len(self.calls) - 1
        for d, call in enumerate(self.calls):
            self.pools[d].pos = 0
            rows, *state = call(probs, *state, gen=self.pools[d])
            rows_out.append(rows)
            widths.append(rows.shape[1])
            if d == last:
                break
            if self.widths is None:  # the sizing run, plain Python: checks before anything is written
                bucket = runner.level_bucket(rows.shape[1])
                if bucket is None:
                    raise TooWide(f"draft level of {rows.shape[1]} rows")
                if runner.length + done + bucket > runner.capacity:
                    raise NoRoom(f"{runner.length + done} + {bucket} cache entries")
                self.reach = max(self.reach, done + bucket)
            if self.spans:
                self.spans[d][0].record()
            logits = runner.children_body(rows, self.ints[0] + done, self.ints[1] if d == 0 else 0, self.ints[2] + d)
            if self.spans:
                self.spans[d][1].record()
            if logits.shape[-1] != self.vocab:
                logits = logits[:, : self.vocab]
            probs = to_probs(logits, self.temperature, self.top_p)
            probs_out.append(probs)
            done += rows.shape[1]
        self.widths = widths
        return torch.cat(rows_out, 1), probs_out

    def build(self, runner, probs, state, gen, length: int, offset: int, position: int) -> None:
        """Size the pools and capture, with this block's inputs. Raises TooWide or NoRoom before
        anything is written. Whatever it raises, it leaves the runner's committed cache and row
        pattern as it found them, so the block can run level by level."""
        self._inputs(probs, state, length, offset, position)
        self._built_on = runner.rows_seen()  # the buffers the graph reads and writes
        seen = self._built_on.clone()
        given = [s.clone() for s in self.state_in]

        def run(body):
            try:
                return body(runner)
            finally:
                runner.rows_seen().copy_(seen)  # the next run (or the replay) reads level 0's

        def check_state():
            if not all(torch.equal(a, b) for a, b in zip(self.state_in, given)):
                self._state_seen = None  # the level function writes its state: copy it in every time
                for a, b in zip(self.state_in, given):
                    a.copy_(b)

        if self.device.type != "cuda":
            run(self._body)
            check_state()
            for pool in self.pools:
                pool.allocate()
            return
        with SetupClock():  # not timed as decoding
            with warming_up(self.device):  # also joined after TooWide or NoRoom
                run(self._body)  # sizes the pools, captures the buckets' own graphs, learns the widths
                for pool in self.pools:
                    pool.allocate()
                plain = self.calls
                self.calls = [fuse(c) for c in plain]
                try:
                    run(self._body)  # compiles the level functions
                except Exception as err:  # Inductor could not compile one: capture the plain ops
                    log.warning("draft levels run unfused: %s", err)
                    self.calls = plain
                with no_host_sync(self.device):
                    run(self._body)  # warm-up; a level function that reads on the host fails here
                check_state()
            graph = torch.cuda.CUDAGraph()
            try:
                with capturing(graph, self.device):
                    self.out = self._body(runner)
            finally:  # on the caller's stream, restored by `capturing` even after a failed capture
                runner.rows_seen().copy_(seen)
            self.graph = graph

    def _inputs(self, probs, state, length: int, offset: int, position: int) -> None:
        self.probs_in.copy_(probs)
        for i, (dst, src) in enumerate(zip(self.state_in, state)):
            # a method's initial state is often the same constant every block (device_graph.constant,
            # never written): copied in once. Any other tensor may have changed (a graph replay
            # rewrites its outputs without a trace on the host), so it is copied every time.
            if self._state_seen is not None and self._state_seen[i] is src and is_constant(src):
                continue
            dst.copy_(src)
            if self._state_seen is not None:
                self._state_seen[i] = src
        self._copied.wait()  # the last replay's copy has left the pinned buffer
        self._pinned_np[:] = (length, offset, position)
        self.ints.copy_(self._pinned, non_blocking=True)
        self._copied.record()

    def prefill(self, gen) -> None:
        """Refill the pools for the next replay now, from gen, which that replay must then be given.

        The engine calls this right after the block's verification has drawn its numbers, before
        it waits for the verification: the next block's levels draw next from the generator in
        any case, so they get the same numbers as when refilled at the replay, and the four
        refill launches leave the time the GPU idles after the read."""
        for pool in self.pools:
            pool.refill(gen)
        self._filled_by = gen

    def rows_drafted(self) -> int:
        return sum(self.widths[:-1])

    def replay(self, runner, probs, state, gen, length: int, offset: int, position: int):
        """Run the levels on `runner` (the one built on, or a proxy of it): (rows [3, total rows],
        probabilities of each drafted level). On a GPU these are the graph's own tensors,
        overwritten by its next replay."""
        if runner.rows_seen() is not self._built_on:
            raise ValueError("a draft levels graph replayed on a runner other than the one it was built on")
        self._inputs(probs, state, length, offset, position)
        if self._filled_by is not gen:
            for pool in self.pools:
                pool.refill(gen)
        self._filled_by = None
        hook = getattr(runner, "graph_replay", None)
        if hook is not None:
            hook(self.spans)
        if self.graph is None:
            out = self._body(runner)
        else:
            self.graph.replay()
            out = self.out
        runner.advance(self.rows_drafted(), len(self.widths) - 1)
        return out
