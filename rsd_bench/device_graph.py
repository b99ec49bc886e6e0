"""Small device computations replayed as CUDA graphs, with randomness a graph can use.

A block's host time is mostly kernel launches of tiny ops (~10 us each on the GPU machines):
sampling a draft token, a draft level's Gumbel-top-k, the verification. `graphed(fn)` captures
such a function once per input shapes and replays it (three launches: refill the pool, copy the
inputs, replay). What is captured is the function compiled by Inductor (`fuse`), so a replay
runs a few fused kernels rather than one per op. A CUDA graph cannot draw from a user's
torch.Generator, so a captured function draws from a `UniformPool`, refilled from the example's
generator before every replay; the sampling helpers (`rsd_bench.sampling`) take either. On the
CPU (or when capture fails) the function runs plainly with the generator.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch

log = logging.getLogger(__name__)

# tests: run the pooled path (padded shapes, pool randomness) without graphs on the CPU
FORCE_POOLED = False
# compile captured bodies with Inductor (see `fuse`); RSD_BENCH_FUSE=0 captures the plain ops
FUSE = os.environ.get("RSD_BENCH_FUSE", "1").strip().lower() not in ("0", "false", "off", "no")


class SetupClock:
    """Wall time spent building graphs (capture, and Inductor compiling a new shape: seconds)
    so far. A graph is built the first time its shape appears, which may be mid-generation;
    the engine's Stopwatch subtracts this time, so building never counts as decoding."""

    seconds = 0.0

    def __enter__(self):
        # GPU work queued before the capture would finish inside it (torch.cuda.graph
        # synchronizes) and be subtracted as setup: let it finish on the clock first
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        SetupClock.seconds += time.perf_counter() - self._t0


_CAUGHT_UP: dict = {}  # device -> how many times the host has waited for all its queued work


def caught_up(device: torch.device) -> None:
    """Tell CopyGuards that the host has just waited for everything queued on `device`'s stream
    (a blocking read such as the verification's): every copy recorded before is done."""
    _CAUGHT_UP[device] = _CAUGHT_UP.get(device, 0) + 1


class CopyGuard:
    """Guards a pinned host buffer whose asynchronous copy to the device may still be running.

    record() after queuing the copy; wait() before writing the buffer again. wait() synchronizes
    on the copy's event only if the host has not caught up with the device since (`caught_up`):
    on the lent GPU machines each CUDA call costs the host 10-30 us, and the calls right after
    the verification read are time the GPU idles through.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.epoch: int | None = None  # _CAUGHT_UP count when last recorded; None: nothing pending

    def record(self, stream=None) -> None:
        if self.event is not None:
            self.event.record(stream)
            self.epoch = _CAUGHT_UP.get(self.device, 0)

    def wait(self) -> None:
        if self.epoch is not None and self.epoch == _CAUGHT_UP.get(self.device, 0):
            self.event.synchronize()
        self.epoch = None


_CONSTANTS: dict[tuple, torch.Tensor] = {}
_CONSTANT_IDS: set[int] = set()  # constants live for the process, so their ids stay theirs


def constant(value, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [size] tensor filled with value, made once per (value, size, dtype, device): a method's
    initial draft state, e.g. every chain at the root. Never write to it. The same tensor every
    block spares a fill launch, and the draft levels graph its copy (DraftLevelsGraph._inputs)."""
    key = (value, size, dtype, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            t = _CONSTANTS[key] = torch.full((size,), value, dtype=dtype, device=device)
        _CONSTANT_IDS.add(id(t))
    return t


def is_constant(t: torch.Tensor) -> bool:
    """Whether t came from `constant`."""
    return id(t) in _CONSTANT_IDS


def pooled(device: torch.device) -> bool:
    return device.type == "cuda" or FORCE_POOLED


class UniformPool:
    """Uniform [0, 1) numbers drawn ahead in one launch and handed out in order of request.

    Until `allocate`, requests only count the numbers a call needs and get throwaway ones (the
    warm-up that sizes the pool). A captured graph reads the same slices at every replay, so the
    pool must be refilled before each one.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.buffer: torch.Tensor | None = None
        self.needed = 0
        self.pos = 0

    def take(self, shape) -> torch.Tensor:
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
        n = math.prod(shape)
        if self.buffer is None:
            self.needed += n
            return torch.rand(shape, device=self.device)
        if self.pos + n > self.buffer.numel():
            raise RuntimeError("UniformPool exhausted: a call drew more numbers than its warm-up did")
        out = self.buffer[self.pos : self.pos + n].view(shape)
        self.pos += n
        return out

    def allocate(self) -> None:
        self.buffer = torch.empty(max(self.needed, 1), device=self.device)
        self.pos = 0

    def refill(self, gen: torch.Generator) -> None:
        self.buffer.uniform_(generator=gen)
        self.pos = 0


def fuse(body):
    """`body` compiled by Inductor, or `body` itself when FUSE is off or compilation fails.

    Inside a CUDA graph every small op still costs its kernel: ~3-5 us of GPU time even on
    [rows, V] tensors this small, and a verification or RSD-S beam level is 20-60 of them.
    Inductor fuses them into a few kernels. Call the result once outside any capture (that call
    compiles); the pool must already be allocated, so the trace reads its buffer.
    """
    if not FUSE:
        return body
    from .fused_ops import raise_recompile_limit

    raise_recompile_limit()  # all graphed bodies share a few code objects, one variant per shape
    return torch.compile(body, dynamic=False)


@contextlib.contextmanager
def warming_up(device: torch.device):
    """The warm-up runs before a capture, on a side stream as torch asks. The caller's stream
    follows the side's work afterwards, also when a warm-up raises (a fallback then runs plainly
    on the caller's stream, over memory the side may still be writing otherwise)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


@contextlib.contextmanager
def capturing(graph: "torch.cuda.CUDAGraph", device: torch.device):
    """`torch.cuda.graph(graph)` that leaves the caller's stream current even when the capture
    fails. When capture_end raises (e.g. the body synchronized), torch's context skips restoring
    the stream, so all later work (and the phase events, lm.Stopwatch) would go to its capture
    stream. (On torch before ~2.12 the allocator may also keep the failed capture's pool.)"""
    current = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph):
            yield
    finally:
        torch.cuda.set_stream(current)


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Make a host synchronization raise (sync debug mode "error") during the warm-up just
    before a capture. A body that reads values on the host then fails there, before the capture
    begins: a capture that fails leaves torch's default CUDA generator in capture mode (seen with
    torch 2.11), so later random draws on it raise."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def capture(body, device: torch.device, pool: UniformPool):
    """Run `body()` to size the pool, then capture it (fused, see `fuse`); returns (graph or None
    on the CPU, outputs)."""
    if device.type != "cuda":
        body()
        pool.allocate()
        return None, None
    with SetupClock():
        return _capture_cuda(body, device, pool)


def _capture_cuda(body, device: torch.device, pool: UniformPool):
    with warming_up(device):
        body()  # sizes the pool
        pool.allocate()
        run = fuse(body)
        try:
            run()  # compiles, with the pool's own numbers
        except Exception as err:  # Inductor could not compile it: capture the plain ops
            log.warning("%s runs unfused: %s", getattr(body, "__qualname__", body), err)
            run = body
        with no_host_sync(device):
            run()  # warm-up; a body that reads on the host fails here, before any capture
    pool.pos = 0
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, device):
        out = run()
    return graph, out


class _Captured:
    def __init__(self, fn, tensors, static: dict, device: torch.device):
        self.inputs = [t.clone() for t in tensors]
        self.pool = UniformPool(device)
        self.body = lambda: fn(*self.inputs, gen=self.pool, **static)
        self.graph, self.out = capture(self._body, device, self.pool)

    def _body(self):
        self.pool.pos = 0
        return self.body()

    def __call__(self, tensors, gen):
        self.pool.refill(gen)
        for dst, src in zip(self.inputs, tensors):
            dst.copy_(src)
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self.out


class graphed:
    """Decorator: `f(*tensors, gen=..., **static)` as a CUDA graph per (device, shapes, dtypes,
    static arguments) on a GPU; plainly with `gen` elsewhere.

    f must be device-only (no host reads) and draw randomness through rsd_bench.sampling with
    the `gen` it gets. Outputs on a GPU are the graph's own tensors, overwritten by the next call
    with the same key: read or copy them before that (passing them back in as inputs is fine).
    """

    def __init__(self, fn):
        self.fn = fn
        self.entries: dict[tuple, _Captured | bool] = {}
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "graphed")

    def __call__(self, *tensors: torch.Tensor, gen, **static):
        device = tensors[0].device
        if not pooled(device):
            return self.fn(*tensors, gen=gen, **static)
        key = (device, tuple((t.shape, t.dtype) for t in tensors), tuple(sorted(static.items())))
        entry = self.entries.get(key)
        if entry is None:
            try:
                entry = _Captured(self.fn, tensors, static, device)
            except Exception as err:  # not capturable: run it plainly from now on
                log.warning("%s runs without a CUDA graph: %s", self.__name__, err)
                entry = False
            self.entries[key] = entry
        if entry is False:
            return self.fn(*tensors, gen=gen, **static)
        return entry(tensors, gen)
