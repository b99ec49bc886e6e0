"""The fast execution mode: a static KV cache and CUDA graphs over a few padded sizes.

Eager Hugging Face forwards on a GPU spend most of their wall clock launching kernels. Here every
forward of n new tokens is padded to a bucket size B (1, 2, 4, ..., 128), attends over the whole
preallocated cache with a 4-D mask that hides unused and rejected entries, and writes its keys
and values by index_copy_ at positions given in a device buffer. With fixed shapes and fixed
buffer addresses, each bucket's forward is captured once as a CUDA graph and replayed.

Attention kernel per bucket (``attention="auto"``, the default on a GPU): each bucket is captured
once with the SDPA attention, once with the plain matmul-softmax ("eager") attention and, with
compile="parts", once with tree_attention's Triton kernel ("rsd_tree"); the graphs are timed over
a few replays, and the fastest is kept (`attention_choice` records it). All compute the same function; which is faster depends on the query rows, the cache capacity and the
kernels SDPA dispatches to (SmolLM2 on an H100, 4096-entry cache: SDPA 5.1-5.2 ms per replay at
2-16 rows, eager 3.9-4.2 ms; at 1 row SDPA 3.3 ms, eager 3.7 ms).

It computes the same function as ModelRunner: padded rows attend only to the shared prefix and
themselves (so they stay finite and no real row ever sees them), masked cache entries get zero attention weight, and the
buffers start zeroed so no NaN can leak through a zero weight. On the CPU the same static path
runs without graphs, which is how the tests check it against the eager path.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import kv_write, tree_attention
from .device_graph import CopyGuard, SetupClock, capturing, warming_up
from .lm import CACHE_KEYWORD, TreeMask, row_ancestors, rows_call

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class StaticTreeCache(Cache):
    """All layers' keys and values in one zeroed buffer [layers, 2, 1, kv_heads, capacity, head_dim]."""

    is_compileable = True

    def __init__(self, capacity: int, device: torch.device):
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.capacity = capacity
        self.kv: torch.Tensor | None = None
        self.num_layers = 0
        self.write_pos = torch.zeros(capacity, dtype=torch.long, device=device)
        self.n = 0  # tokens in the call in flight (padded size)
        self.one_kernel_writes = False  # kv_write's Triton kernel (GraphedRunner's compile="parts")

    def allocate(self, layers: int, kv_heads: int, head_dim: int, dtype, device) -> None:
        self.num_layers = layers
        self.kv = torch.zeros(layers, 2, 1, kv_heads, self.capacity, head_dim, dtype=dtype, device=device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        idx = self.write_pos[: key_states.shape[-2]]
        keys, values = self.kv[layer_idx, 0], self.kv[layer_idx, 1]
        if self.one_kernel_writes and kv_write.supported(keys, values, key_states, value_states):
            kv_write.write_kv(keys, values, key_states, value_states, idx)  # one launch, not two
        else:
            keys.index_copy_(2, idx, key_states)
            values.index_copy_(2, idx, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs):
        return self.capacity, 0

    def get_max_length(self) -> int:
        return self.capacity


ATTENTIONS = ("sdpa", "eager", tree_attention.NAME)


def _set_attention(model, impl: str) -> None:
    """Switch the attention function the model's layers look up at call time (HF reads
    config._attn_implementation on every forward; a trimmed-vocabulary draft forwards the write)."""
    model.config._attn_implementation = impl


def _kv_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


COMPILE_MODES = ("parts", "parts-cublas", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(value) -> str | None:
    """GraphedRunner's `compile` as None (off) or one of COMPILE_MODES; configs may spell off as
    false / none / off and the whole-forward default as true."""
    text = str(value).strip().lower() if value is not None else ""
    if value is False or text in ("", "none", "false", "off", "no", "0"):
        return None
    if value is True or text in ("true", "on", "yes", "1"):
        return "default"
    if text not in COMPILE_MODES:
        raise ValueError(f"compile must be none, parts, true or a torch.compile mode "
                         f"({', '.join(COMPILE_MODES[1:])}); got {value!r}")
    return text


class GraphedRunner:
    """Drop-in replacement for ModelRunner with a static cache; CUDA graphs when on a GPU."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, capacity: int = 2048,
                 use_graphs: bool | None = None, buckets: tuple[int, ...] = BUCKETS, attention: str = "auto",
                 compile: bool | str = False):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = vocab_size
        self.capacity = capacity
        self.buckets = buckets
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.cache = StaticTreeCache(capacity, self.device)
        self.cache.allocate(*_kv_shape(model), self.dtype, self.device)
        self.length = 0
        self.calls = 0
        self.draft_graphs: dict = {}  # draft_graph.DraftLevelsGraph per method level function and shapes
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, input bytes (see _call_layout), logits)
        self._neg = torch.finfo(self.dtype).min
        self._rows = torch.arange(max(buckets), device=self.device)  # row indices of a bucket call
        # Bucket calls send their inputs as two small host buffers (see _pack) and build the mask
        # and cache write positions on the device, inside the graph: a decode step's host work
        # is then a few CPU tensor ops and two copies instead of ~15 launches of mask building.
        # Pinned on a GPU, so the copies are asynchronous; `_copied` guards their reuse.
        self._cols = torch.arange(capacity, device=self.device)
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._negt = torch.full((), self._neg, dtype=self.dtype, device=self.device)
        pin = self.device.type == "cuda"
        self._pin_ints = torch.zeros(3 * max(buckets) + 3, dtype=torch.long, pin_memory=pin)
        self._ints_np = self._pin_ints.numpy()
        # keep()'s indices: a buffer and guard of their own, so that a call's wait for its inputs'
        # buffer never waits for a compaction queued behind other work (the engine queues the
        # target's behind the next draft)
        self._pin_keep = torch.zeros(self._pin_ints.numel(), dtype=torch.long, pin_memory=pin)
        self._keep_np = self._pin_keep.numpy()
        self._keep_src = torch.zeros(self._pin_keep.numel(), dtype=torch.long, device=self.device)
        self._kept = CopyGuard(self.device)
        # a bucket call's inputs travel in one copy: [ints (int64, 2 * bucket + 3) | bits (uint8)]
        # as bytes, laid out as the bucket graph's own buffer (`_call_layout`)
        self._pin_call = torch.zeros(8 * (2 * max(buckets) + 3) + max(buckets) * capacity, dtype=torch.uint8,
                                     pin_memory=pin)
        self._call_np = self._pin_call.numpy()
        self._call_views: dict[tuple, tuple] = {}  # (bucket, bytes, rows) -> (graph, device bytes, pinned bytes, logits)
        self._copied = CopyGuard(self.device)
        # every bucket call leaves its rows' attention pattern here, so that forward_children
        # can build its rows from them on the device (valid: no keep or prefill since)
        self._rows_seen = torch.zeros(max(buckets), capacity, dtype=torch.bool, device=self.device)
        self._rows_valid = False
        self._wide_seen: torch.Tensor | None = None  # ... or the pattern of a wider forward_children call
        self._child_graphs: dict[int, tuple] = {}  # bucket -> (graph, ints, logits)
        self._child_views: dict[tuple, tuple] = {}  # (bucket, rows) -> see _children_graph
        self._tree_graphs: dict[tuple, tuple] = {}  # (bucket, depth) -> (graph, ints, rows, logits): forward_rows
        # (start, end) CUDA events a benchmark proxy sets for one call: recorded around the call's
        # GPU work, after its host packing (bench_engine.ForwardEvents)
        self.span_events: tuple | None = None
        self._tril = np.tril(np.ones((max(buckets), max(buckets)), dtype=np.uint8))  # causal blocks
        # attention implementation per captured bucket: "auto" times the candidates (GPU graphs only)
        self.model_attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if attention not in ("auto",) + ATTENTIONS:
            raise ValueError(f"attention must be auto, {', '.join(ATTENTIONS)}; got {attention!r}")
        if attention == tree_attention.NAME and not tree_attention.register():
            raise ValueError("attention rsd_tree needs Triton, which this environment lacks")
        self.attention = attention
        if attention != "auto":
            _set_attention(model, attention)
        self.attention_choice: dict[int, dict] = {}  # bucket -> {"chosen": impl, "ms": {impl: ms}}
        # torch.compile of the bucketed forwards. compile="parts": only the small elementwise ops
        # (RMSNorm, rotary, SiLU * up; fused_ops.fuse_small_ops, counts in `fused`) run as compiled
        # kernels, and the linear layers run skinny_matmul's kernels over concatenated q/k/v and
        # gate/up weights ("parts-cublas" leaves the matmuls to cuBLAS, for comparisons); cache
        # writes and attention stay eager, which avoids the whole-cache copies of compiling the
        # cache writes (below). True = the whole forward in default mode, or a mode
        # string such as "max-autotune-no-cudagraphs": measured on an H200 that is 3x SLOWER (7B
        # step 21.6 vs 6.7 ms per replay), because functionalization turns the index_copy_ cache
        # writes into copies of each layer's whole K/V plus a copy-back of the full cache (visible
        # in Inductor's output code; per-layer cache buffers Inductor can re-inplace might avoid it).
        # Either way the CUDA graphs are still ours, compilation happens in the first warm-up of a
        # bucket, and calls longer than the largest bucket (prefill) stay uncompiled: no recompiles.
        self.compile_mode = _compile_mode(compile)
        self._compiled = None
        self.fused: dict[str, int] = {}
        if self.compile_mode in ("parts", "parts-cublas"):
            from .fused_ops import fuse_small_ops

            self.fused = fuse_small_ops(model, matmuls=self.compile_mode == "parts")
            self.cache.one_kernel_writes = self.compile_mode == "parts"
            self._compiled = self._call_fused
        elif self.compile_mode is not None:
            from .fused_ops import raise_recompile_limit

            mode = None if self.compile_mode == "default" else self.compile_mode
            raise_recompile_limit()  # one compiled variant per (runner, bucket, attention kernel)
            self._compiled = torch.compile(self._call_model, dynamic=False, mode=mode)
        # the attention kernels `attention="auto"` times per bucket
        self.attention_candidates = ("sdpa", "eager")
        if self.compile_mode == "parts" and tree_attention.register():
            self.attention_candidates += (tree_attention.NAME,)

    @staticmethod
    def buckets_default() -> tuple[int, ...]:
        return BUCKETS

    def _call_model(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                          **{CACHE_KEYWORD: self.cache}).logits

    def _call_fused(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """compile="parts": the model's fused ops run only within this scope."""
        from .fused_ops import enabled

        with enabled():
            return self._call_model(ids, pos, mask)

    def _bucket_forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The forward of a bucket-sized call: compiled when asked for."""
        return (self._compiled or self._call_model)(ids, pos, mask)

    # -- the ModelRunner interface -------------------------------------------------------------
    def reset(self, capacity: int) -> None:
        # slack of one largest bucket: padded rows and lazy graph warm-ups write past the end
        if capacity + max(self.buckets) > self.capacity:
            raise ValueError(f"this example needs {capacity} cache entries but the fast runner was "
                             f"built with capacity {self.capacity}; raise `capacity` (pair.max_context)")
        self.length = 0
        self.calls = 0
        self._rows_valid = False
        self._wide_seen = None

    def _bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _mask(self, n: int, attend: torch.Tensor | None) -> torch.Tensor:
        """Additive mask [n, capacity] of a call longer than the largest bucket (a prefill; bucket
        calls build theirs inside the graph, see _bucket_step), rows per `attend`.

        Built where the model runs because a [n, capacity] tensor on the host crosses PyTorch's
        CPU parallelism threshold (32768 elements) at 16 rows of a 4096-entry cache: every call then
        opened an OpenMP parallel region, which cost ~35 ms per forward on the GPU machines (the
        graph replay itself took ~4 ms). Only the small `attend` block travels to the device.
        """
        dev, past = self.device, self.length
        allowed = torch.zeros(n, self.capacity, dtype=torch.bool, device=dev)
        if isinstance(attend, TreeMask):
            attend = attend.dense(n, past + n)
        if attend is None:
            attend = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()
        else:
            attend = attend.to(dev, non_blocking=True)
        if attend.shape[1] == n:
            allowed[:n, :past] = True
            allowed[:n, past : past + n] = attend
        else:
            allowed[:n, : past + n] = attend
        return torch.zeros(n, self.capacity, dtype=self.dtype, device=dev).masked_fill_(~allowed, self._neg)

    def _pack(self, tokens: list[int], positions: list[int], bucket: int, attend) -> int:
        """Write a bucket call's inputs into the host buffers; returns the bytes of `bits` used.

        ints = [ids (bucket), positions (bucket), P, width, length]: every row sees the cache
        columns below P; columns P .. P+width-1 follow the row-major bit block [bucket, width]
        in `bits`. The block holds the tree pattern and each padded row's own column (padded rows
        see only the prefix and themselves, stay finite, and no real row sees them).
        """
        n, length = len(tokens), self.length
        if isinstance(attend, TreeMask):
            P = min(attend.prefix, length)
            attend_rows = attend.rows
            attend = None
        else:
            attend_rows = None
            if attend is not None:
                attend = attend.to("cpu", torch.bool)
            if attend is None or attend.shape[1] == n:
                P = length
            else:  # [n, length + n]: the prefix every row sees goes to P, the rest into the block
                partial = (~attend.all(0)).nonzero()
                P = min(int(partial[0]) if len(partial) else length, length)
                attend = attend[:, P:]
        width = length + bucket - P
        self._copied.wait()  # the previous call's copies have left these buffers
        pad = [0] * (bucket - n)
        # numpy views of the pinned buffer only: a list assignment there costs ~1 us, a torch op on
        # a CPU tensor 5-10 (this runs right after the verification read, while the GPU idles)
        head = 8 * (2 * bucket + 3)
        self._call_np[:head].view(np.int64)[:] = tokens + pad + positions + pad + [P, width, length]
        used = bucket * width
        flat = self._call_np[head : head + used]
        flat[:] = 0
        own = length - P  # block column of the first new row
        if attend_rows is not None:
            if not all(P <= c < length + n for row in attend_rows for c in row):
                raise ValueError(f"a TreeMask row names a column outside [{P}, {length + n}): {attend_rows}")
            flat[[i * width + c - P for i, row in enumerate(attend_rows) for c in row]] = 1
        else:
            bits = flat.reshape(bucket, width)
            if attend is None:
                bits[:n, own : own + n] = self._tril[:n, :n]
            else:
                bits[:n, : attend.shape[1]] = attend.numpy()
        if bucket > n:  # padded rows: the prefix and themselves
            flat[[r * width + own + r for r in range(n, bucket)]] = 1
        return used

    def packed_call(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ints, bits) of the last _pack for `bucket`, as views of the pinned buffer (tests)."""
        return self._call_layout(bucket, self._pin_call)

    def _call_layout(self, bucket: int, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ints, bits) views of a bucket call's byte buffer [ints (int64) | bits (uint8)]."""
        head = 8 * (2 * bucket + 3)
        return buf[:head].view(torch.long), buf[head:]

    def _bucket_step(self, bucket: int, ints: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """A bucket call from its packed inputs (see _pack), all on the device: what the graph holds."""
        P, width, length = ints[2 * bucket], ints[2 * bucket + 1], ints[2 * bucket + 2]
        torch.add(self._rows[:bucket], length, out=self.cache.write_pos[:bucket])
        rel = self._cols - P
        in_block = (rel >= 0) & (rel < width)
        idx = self._rows[:bucket, None] * width + torch.minimum(rel.clamp(min=0), width - 1)
        allowed = (rel < 0) | (in_block & (bits[idx] != 0))
        self._rows_seen[:bucket].copy_(allowed)
        return self._masked_forward(bucket, allowed, ints[:bucket], ints[bucket : 2 * bucket])

    def _children_step(self, bucket: int, ints: torch.Tensor) -> torch.Tensor:
        """A forward_children call, all on the device: ints = [parent rows (bucket), ids (bucket),
        positions (bucket), length, parent offset]."""
        return self._children_rows(bucket, ints[:bucket], ints[bucket : 2 * bucket], ints[2 * bucket : 3 * bucket],
                                   ints[3 * bucket], ints[3 * bucket + 1])

    def _children_rows(self, bucket: int, parent, ids, pos, length, offset) -> torch.Tensor:
        """Rows [bucket] of parents, ids and positions, written from cache index `length` on: row i
        sees what row offset + parent[i] of the last call saw (`_rows_seen`), and itself."""
        torch.add(self._rows[:bucket], length, out=self.cache.write_pos[:bucket])
        own = self._cols == self.cache.write_pos[:bucket, None]
        allowed = self._rows_seen.index_select(0, parent + offset) | own
        self._rows_seen[:bucket].copy_(allowed)
        return self._masked_forward(bucket, allowed, ids, pos)

    def _rows_step(self, bucket: int, depth: int, ints: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A forward_rows call, all on the device: ints = [positions (bucket), parent offsets
        (bucket), length, n, root], rows = long [2, bucket] with call rows 1 .. n-1's [parent;
        token] (column 0 and columns from n on are ignored: the root comes from ints, padded rows
        see the cache and themselves); depth: the most ancestors a row has."""
        pos, offsets = ints[:bucket], ints[bucket : 2 * bucket]
        length, n, root = ints[2 * bucket], ints[2 * bucket + 1], ints[2 * bucket + 2]
        r = self._rows[:bucket]
        real = (r >= 1) & (r < n)
        parent = torch.where(real, rows[0] + offsets, r).clamp(0, bucket - 1)
        ids = torch.where(real, rows[1], torch.where(r == 0, root, 0))
        torch.add(r, length, out=self.cache.write_pos[:bucket])
        seen = row_ancestors(parent, depth)
        rel = self._cols - length
        block = seen.gather(1, rel.clamp(0, bucket - 1).expand(bucket, -1))
        allowed = (rel < 0) | ((rel < bucket) & block)
        self._rows_seen[:bucket].copy_(allowed)
        return self._masked_forward(bucket, allowed, ids, pos)

    def _masked_forward(self, bucket: int, allowed: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor):
        mask = torch.where(allowed, self._zero, self._negt).view(1, 1, bucket, self.capacity)
        tree_attention.set_bound(self.cache.write_pos)  # rsd_tree reads no column past the last row's
        logits = self._bucket_forward(ids.view(1, -1), pos.view(1, -1), mask)
        return logits.float()  # inside the graph: forward() then hands them out without a launch

    @torch.no_grad()
    def forward(self, tokens, positions, attend: torch.Tensor | None = None) -> torch.Tensor:
        tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]
        positions = [int(p) for p in (positions.tolist() if isinstance(positions, torch.Tensor) else positions)]
        n = len(tokens)
        bucket = self._bucket(n)
        self._check_room(bucket if bucket is not None else n)
        if bucket is not None:
            used = self._pack(tokens, positions, bucket, attend)
            self._mark(0)
            logits = self._run_bucket(bucket, used, n)
        else:  # longer than the largest bucket (prefill): no graph, the mask built directly
            self._mark(0)
            self._rows_valid = False
            self._wide_seen = None
            mask = self._mask(n, attend)
            self.cache.write_pos[:n].copy_(torch.arange(self.length, self.length + n))
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(1, -1)
            logits = self._out_rows(self._call_model(ids, pos, mask.view(1, 1, n, -1))[0], n)
        self._mark(1)
        self.length += n
        self.calls += 1
        # on a GPU these are the bucket graph's own output: read or copy them before the next call
        # of the same bucket size (the engine turns them into probabilities at once)
        return logits

    @torch.no_grad()
    def forward_children(self, rows: torch.Tensor, positions: list[int], parent_offset: int = 0) -> torch.Tensor:
        """ModelRunner.forward_children: rows = [parent; token] (long [2, n], on the device); row i
        extends row parent_offset + parent[i] of the last call. A graph of its own per bucket
        builds the rows' pattern from the last call's on the device and reads the token ids
        there: the host writes only positions and lengths, and reads nothing back, so the next
        draft level is queued while the GPU still runs this one (four launches; the host waits
        only until the previous call's inputs have left the pinned buffer). A level wider than
        the largest bucket, and the level after it, run without a graph (_wide_children)."""
        n = len(positions)
        bucket = self._bucket(n)
        if not self._rows_valid and self._wide_seen is None:
            raise RuntimeError("forward_children follows a forward of the same runner (none since the "
                               "last reset, keep or prefill)")
        self._check_room(bucket or n)
        if bucket is None or self._wide_seen is not None:
            return self._wide_children(rows, positions, parent_offset)
        self._copied.wait()
        size = 3 * bucket + 2
        self._ints_np[:size] = [0] * (2 * bucket) + list(positions) + [0] * (bucket - n) + [self.length, parent_offset]
        self._mark(0)
        if self.use_graphs:
            views = self._child_views.get((bucket, n))
            if views is None:
                views = self._children_graph(bucket, n)
            graph, ints, pinned, rows_in, out = views
            ints.copy_(pinned, non_blocking=True)
            self._copied.record()
            rows_in.copy_(rows)
            graph.replay()
        else:
            ints = self._pin_ints[:size].to(self.device, copy=True)
            ints[: 2 * bucket].view(2, bucket)[:, :n] = rows
            out = self._out_rows(self._children_step(bucket, ints)[0], n)
        self._mark(1)
        self.length += n
        self.calls += 1
        return out

    def takes_rows(self, n: int) -> bool:
        """Whether forward_rows takes n rows as a bucket call now: wider calls would run like a
        prefill (ungraphed, reading the tokens on the host) over rows that may be mostly dead."""
        bucket = self._bucket(n)
        return bucket is not None and self.length + bucket <= self.capacity

    @torch.no_grad()
    def forward_rows(self, root: int, rows: torch.Tensor, parent_offsets: list[int], positions: list[int]) -> torch.Tensor:
        """ModelRunner.forward_rows: a root and R tree rows [parent; token] given on the device.
        A graph of its own per bucket builds the tree pattern from the parents on the device: the
        host writes positions, offsets and lengths, copies the rows there and replays, without
        reading anything back. A call wider than the largest bucket runs like a prefill."""
        n, depth = len(positions), max(positions) - positions[0]
        bucket = self._bucket(n)
        if bucket is None:
            ids, parent = rows_call(root, rows, parent_offsets)
            return self.forward(ids, positions, row_ancestors(parent, depth))
        self._check_room(bucket)
        self._copied.wait()  # the previous call's copies have left the pinned buffer
        pad = [0] * (bucket - n)
        size = 2 * bucket + 3
        self._ints_np[:size] = list(positions) + pad + [0] + list(parent_offsets) + pad + [self.length, n, int(root)]
        self._rows_valid, self._wide_seen = True, None
        self._mark(0)
        if self.use_graphs:
            if (bucket, depth) not in self._tree_graphs:
                self._tree_graphs[bucket, depth] = self._first_use(bucket, lambda: self._capture_rows(bucket, depth))
            graph, ints, rows_in, logits = self._tree_graphs[bucket, depth]
            ints.copy_(self._pin_ints[:size], non_blocking=True)
            self._copied.record()
            rows_in[:, 1:n].copy_(rows)
            graph.replay()
            out = logits[0]
        else:
            ints = self._pin_ints[:size].to(self.device, copy=True)
            rows_in = torch.zeros(2, bucket, dtype=torch.long, device=self.device)
            rows_in[:, 1:n] = rows
            out = self._rows_step(bucket, depth, ints, rows_in)[0]
        self._mark(1)
        self.length += n
        self.calls += 1
        return self._out_rows(out, n)

    def _mark(self, i: int) -> None:
        """Record span_events[i] (0: the call's GPU work starts, 1: it is queued), if set."""
        if self.span_events is not None:
            self.span_events[i].record()

    # -- draft levels inside a caller's CUDA graph (draft_graph.DraftLevelsGraph) ------------------
    def level_bucket(self, n: int) -> int | None:
        """The bucket a draft level of n rows runs in when captured into a draft graph (None: it
        cannot be; too wide). Captures that bucket's own graph first, for its attention choice."""
        bucket = self._bucket(n)
        if bucket is not None and self.use_graphs and bucket not in self._graphs:
            seen = self._rows_seen.clone()  # the capture's warm-ups overwrite it
            self._capture(bucket)  # the caller is building a graph: its SetupClock covers this
            self._rows_seen.copy_(seen)
        return bucket

    @torch.no_grad()
    def children_body(self, rows: torch.Tensor, length, offset, position) -> torch.Tensor:
        """forward_children's device work for a caller that captures it into its own graph:
        rows = long [>= 2, n] ([parent; token; ...]); length (the cache index of row 0), offset
        (the parent rows' offset in the last call) and position (every row's) are 0-d device
        tensors or ints. Updates no host state: the caller advances the runner (`advance`) after
        its replay. Returns float logits [n, vocab]."""
        n = rows.shape[1]
        bucket = self._bucket(n)
        if bucket is None:
            raise ValueError(f"a draft level of {n} rows is wider than the largest bucket {max(self.buckets)}")
        parent, ids = rows[0], rows[1]
        if bucket > n:
            parent = torch.nn.functional.pad(parent, (0, bucket - n))
            ids = torch.nn.functional.pad(ids, (0, bucket - n))
        # the kernel the bucket's own graph chose
        with self._chosen_attention(bucket) if self.use_graphs else contextlib.nullcontext():
            pos = position.expand(bucket) if isinstance(position, torch.Tensor) else self._rows[:bucket] * 0 + position
            logits = self._children_rows(bucket, parent, ids, pos, length, offset)[0, :n]
        return logits if self.vocab_size is None else logits[:, : self.vocab_size]

    def rows_seen(self) -> torch.Tensor:
        """The row patterns children_body reads and writes (callers' warm-ups save and restore them)."""
        return self._rows_seen

    def children_ready(self) -> bool:
        """Whether a children_body level can follow now: the last call was a bucket call (or a
        children level) and nothing has moved the cache since."""
        return self._rows_valid and self._wide_seen is None

    def advance(self, rows: int, calls: int) -> None:
        """Account for draft levels a caller's graph ran through children_body."""
        self.length += rows
        self.calls += calls

    def _wide_children(self, rows: torch.Tensor, positions: list[int], parent_offset: int) -> torch.Tensor:
        """forward_children without a graph, like a prefill: for levels of more rows than the
        largest bucket (RSD-C with b = 12-12-..., W or K > 128), whose pattern is kept whole."""
        n, dev, length = len(positions), self.device, self.length
        self._mark(0)
        prev = self._wide_seen if self._wide_seen is not None else self._rows_seen
        own = self._cols == torch.arange(length, length + n, device=dev)[:, None]
        allowed = prev[parent_offset:].index_select(0, rows[0]) | own
        mask = torch.zeros(n, self.capacity, dtype=self.dtype, device=dev).masked_fill_(~allowed, self._neg)
        self.cache.write_pos[:n].copy_(torch.arange(length, length + n))
        pos = torch.tensor(positions, dtype=torch.long, device=dev).view(1, -1)
        logits = self._call_model(rows[1].reshape(1, -1), pos, mask.view(1, 1, n, -1))[0].float()
        self._mark(1)
        self._rows_valid, self._wide_seen = False, allowed
        self.length += n
        self.calls += 1
        return logits if self.vocab_size is None else logits[:, : self.vocab_size]

    def _children_graph(self, bucket: int, n: int) -> tuple:
        """forward_children's graph of a bucket (captured on first use) and the views a call of n
        rows uses, made once: every tensor op costs host time between two draft levels."""
        if bucket not in self._child_graphs:
            self._child_graphs[bucket] = self._first_use(bucket, lambda: self._capture_children(bucket))
        graph, ints, logits = self._child_graphs[bucket]
        out = logits[0, :n] if self.vocab_size is None else logits[0, :n, : self.vocab_size]
        views = (graph, ints, self._pin_ints[: 3 * bucket + 2], ints[: 2 * bucket].view(2, bucket)[:, :n], out)
        self._child_views[(bucket, n)] = views
        return views

    def _out_rows(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """A call's float logits [n, vocab] from the model's [rows, V]."""
        logits = logits[:n]
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        return logits if logits.dtype == torch.float32 else logits.float()

    def _run_bucket(self, bucket: int, used: int, n: int) -> torch.Tensor:
        """Run a packed bucket call of n rows: its graph on a GPU, the same step plainly elsewhere."""
        self._rows_valid, self._wide_seen = True, None
        size = 8 * (2 * bucket + 3) + used
        if not self.use_graphs:
            buf = self._pin_call[:size].to(self.device, copy=True)
            return self._out_rows(self._bucket_step(bucket, *self._call_layout(bucket, buf))[0], n)
        views = self._call_views.get((bucket, size, n))
        if views is None:  # views made once: each slicing op costs the host a few us per call
            if len(self._call_views) > 512:  # widths vary with a host-built tree's prefix: stay bounded
                self._call_views.clear()
            if bucket not in self._graphs:
                with SetupClock():  # not timed as decoding
                    self._capture(bucket)
            graph, buf, logits = self._graphs[bucket]
            views = self._call_views[bucket, size, n] = (graph, buf[:size], self._pin_call[:size],
                                                         self._out_rows(logits[0], n))
        graph, buf, pinned, logits = views
        buf.copy_(pinned, non_blocking=True)  # one copy: ints and bits
        self._copied.record()
        graph.replay()
        return logits

    @torch.no_grad()
    def keep(self, start: int, rel_indices: list[int]) -> None:
        self._rows_valid, self._wide_seen = False, None  # the last call's columns no longer match the cache
        n = len(rel_indices)
        if n and list(rel_indices) != list(range(n)):
            # the indices travel through the pinned buffer, asynchronously: a blocking copy from
            # pageable memory would wait for all queued GPU work (the engine may keep while a draft runs)
            if n <= len(self._keep_np):
                self._kept.wait()
                self._keep_np[:n] = [start + i for i in rel_indices]
                src = self._keep_src[:n]
                src.copy_(self._pin_keep[:n], non_blocking=True)
                self._kept.record()
            else:
                src = torch.as_tensor(rel_indices, dtype=torch.long).add_(start).to(self.device)
            kv = self.cache.kv
            kv[:, :, :, :, start : start + n] = kv.index_select(4, src)
        self.length = start + n

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _capture(self, bucket: int) -> None:
        if self.attention != "auto":
            self._graphs[bucket] = self._capture_one(bucket)
            self.attention_choice[bucket] = {"chosen": self.attention, "ms": {}}
            return
        timed = {}
        try:
            for impl in self.attention_candidates:
                _set_attention(self.model, impl)
                entry = self._capture_one(bucket)
                timed[impl] = (self._time_graph(entry[0]), entry)
        finally:
            _set_attention(self.model, self.model_attention)
        chosen = min(timed, key=lambda k: timed[k][0])
        self._graphs[bucket] = timed[chosen][1]
        self.attention_choice[bucket] = {"chosen": chosen, "ms": {k: round(v[0], 4) for k, v in timed.items()}}
        log.info("bucket %d: attention %s (%s ms per replay)", bucket, chosen,
                 {k: round(v[0], 3) for k, v in timed.items()})
        self.cache.kv[:, :, :, :, self.capacity - bucket :].zero_()

    def _time_graph(self, graph, reps: int = 10) -> float:
        """ms per replay (the writes land in the last slots, zeroed after capture)."""
        graph.replay()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    def _capture_one(self, bucket: int) -> tuple:
        # warm-ups, capture and timing replays write where nobody reads: the last `bucket` slots
        # (length = P = capacity - bucket, each row sees the prefix and itself)
        last = self.capacity - bucket
        buf = torch.zeros(8 * (2 * bucket + 3) + bucket * self.capacity, dtype=torch.uint8, device=self.device)
        ints, bits = self._call_layout(bucket, buf)
        ints.copy_(torch.tensor([0] * (2 * bucket) + [last, bucket, last], dtype=torch.long))
        bits[: bucket * bucket] = torch.eye(bucket, dtype=torch.uint8, device=self.device).view(-1)
        graph, logits = self._graph_of(lambda: self._bucket_step(bucket, ints, bits), last)
        return (graph, buf, logits)

    def _capture_children(self, bucket: int) -> tuple:
        """The forward_children graph of a bucket, with the attention kernel its bucket graph chose."""
        last = self.capacity - bucket
        ints = torch.tensor([0] * (3 * bucket) + [last, 0], dtype=torch.long, device=self.device)
        with self._chosen_attention(bucket):
            graph, logits = self._graph_of(lambda: self._children_step(bucket, ints), last)
        return (graph, ints, logits)

    def _capture_rows(self, bucket: int, depth: int) -> tuple:
        """The forward_rows graph of a bucket, with the attention kernel its bucket graph chose."""
        last = self.capacity - bucket
        ints = torch.tensor([0] * (2 * bucket) + [last, 1, 0], dtype=torch.long, device=self.device)
        rows = torch.zeros(2, bucket, dtype=torch.long, device=self.device)
        with self._chosen_attention(bucket):
            graph, logits = self._graph_of(lambda: self._rows_step(bucket, depth, ints, rows), last)
        return (graph, ints, rows, logits)

    @contextlib.contextmanager
    def _chosen_attention(self, bucket: int):
        """The model runs with the attention kernel the bucket's own graph chose, then with its own."""
        _set_attention(self.model, self.attention_choice[bucket]["chosen"])
        try:
            yield
        finally:
            _set_attention(self.model, self.model_attention if self.attention == "auto" else self.attention)

    def _first_use(self, bucket: int, capture):
        """capture() of a call graph at its first use, mid-generation: untimed (SetupClock), after
        the bucket's own graph (its attention choice), keeping the rows' patterns the warm-ups
        overwrite."""
        with SetupClock():  # not timed as decoding
            seen = self._rows_seen.clone()
            if bucket not in self._graphs:
                self._capture(bucket)
            out = capture()
            self._rows_seen.copy_(seen)
        return out

    def _check_room(self, rows: int) -> None:
        if self.length + rows > self.capacity:
            raise RuntimeError(f"cache capacity {self.capacity} exceeded ({self.length} + {rows}); "
                               "raise the fast runner's capacity")

    def _graph_of(self, step, last: int) -> tuple:
        dev = self.device
        with warming_up(dev), torch.no_grad():
            for _ in range(2):  # the first also compiles, when compiling
                step()
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, dev), torch.no_grad():
            logits = step()
        self.cache.kv[:, :, :, :, last:].zero_()
        return graph, logits

    def capture(self, max_tokens: int) -> None:
        """Capture every bucket up to max_tokens now, so no capture happens while timing."""
        if not self.use_graphs:
            return
        for b in self.buckets:
            if b not in self._graphs:
                self._capture(b)
            if b >= max_tokens:
                break
        self._rows_valid = False  # the warm-ups wrote their own rows over _rows_seen
