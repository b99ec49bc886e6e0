"""Bias-free linear layers over a few rows (decode steps and small trees) as Triton kernels.

At batch 1 a decode step is a chain of matrix-vector products: each weight is read once and the
time is bytes / bandwidth. cuBLAS reaches ~77% of the device-to-device copy rate on a 7B step
(4.05 ms of matmuls against a 3.13 ms floor on an H200), which alone caps the AR step below the
70%-of-floor goal of issue 5. These kernels stream each weight row block once, with wide
loads and several blocks in flight, for up to `MAX_ROWS` rows of input:

- `_gemv_kernel` (1 row): each program owns BLOCK_N output features and walks K in BLOCK_K
  chunks, multiplying in float32 on the CUDA cores (no tensor-core staging for a single row).
- `_dot_kernel` (2..MAX_ROWS rows): the same walk with `tl.dot` on a [BLOCK_M, BLOCK_K] x
  [BLOCK_K, BLOCK_N] tile; rows are padded to BLOCK_M >= 16 (tensor-core minimum), so a tree
  of 16 nodes reads the weights exactly once, like one row.

Both accumulate in float32 and round once to the output dtype, like cuBLAS; only the summation
order differs. `CANDIDATES` are the launch configurations that won `scripts/bench_matmul.py`'s
sweep; on a GPU `choose` times them and cuBLAS once per shape and rows bucket and keeps the
fastest. On a machine without Triton or a GPU, `available()` is False and callers keep
F.linear. Under TRITON_INTERPRET=1 the kernels run on the CPU, which is how the tests check them
against float64 products.
"""

from __future__ import annotations

import os

import torch

from .device_graph import capturing, warming_up

try:  # Triton ships with CUDA builds of torch; the CPU test environment may install it for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

MAX_ROWS = 64
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on tensors of `device`."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (INTERPRET and kind == "cpu")


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, stride_wn, K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # K is a compile-time constant (a model has two or three): known trip counts, and the
        # interpreter cannot loop over a runtime scalar under numpy >= 2.4
        # keep a [BLOCK_N, BLOCK_K] float32 partial sum and reduce once at the end: no
        # cross-thread reduction inside the loop, so loads of the next chunk overlap the math
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            if EVEN:
                x = tl.load(x_ptr + kk)
                w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], eviction_policy="evict_first")
            else:
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
                w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :],
                            mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _dot_kernel(x_ptr, w_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :],
                        mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0,
                        eviction_policy="evict_first")
            if UPCAST:  # the CPU interpreter's dot is wrong for 16-bit operands
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


# Launch configurations per rows bucket: the first is the default (used where no timing is
# possible: the CPU interpreter, or a first call during graph capture); on a GPU `choose` times
# all of them and cuBLAS on the actual shape once and keeps the fastest. The candidates are the
# winners of scripts/bench_matmul.py's sweep over the Llama-2-7B shapes on an H200
# (scripts/bench_results/2026-11-26_h200_matmul_sweep.json).
CANDIDATES = {
    "gemv": [dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=3),
             dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, num_stages=3),
             dict(BLOCK_N=4, BLOCK_K=512, num_warps=8, num_stages=1),
             dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=1),
             dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=1)],
    16: [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
         dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=5),
         dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=5),
         dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)],
    32: [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=5),
         dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
         dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)],
    64: [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=5),
         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3),
         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=5)],
}
CONFIGS = {bucket: cands[0] for bucket, cands in CANDIDATES.items()}
CUBLAS = "cublas"
_CHOICE: dict[tuple, object] = {}  # (N, K, bucket, dtype, device) -> CUBLAS or a config
_TIMINGS: dict[tuple, dict] = {}  # the same key -> {candidate label: microseconds}


def rows_bucket(m: int) -> int | str:
    return "gemv" if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 64


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, cfg: dict) -> torch.Tensor:
    """out[N] = weight[N, K] @ x[K] (all contiguous)."""
    N, K = weight.shape
    cfg = dict(cfg)
    bn, bk = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    even = (N % bn == 0) and (K % bk == 0)
    _gemv_kernel[(triton.cdiv(N, bn),)](x, weight, out, N, weight.stride(0), K,
                                        BLOCK_N=bn, BLOCK_K=bk, EVEN=even, **cfg)
    return out


def dot(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, cfg: dict) -> torch.Tensor:
    """out[M, N] = x[M, K] @ weight[N, K]^T (rows of x and out contiguous)."""
    M, K = x.shape
    N = weight.shape[0]
    cfg = dict(cfg)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _dot_kernel[grid](x, weight, out, M, N, x.stride(0), weight.stride(0), out.stride(0), K,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=INTERPRET, **cfg)
    return out


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes, dtypes and layouts the kernels handle: a contiguous 2-D weight of x's dtype,
    at most MAX_ROWS rows, on a device where Triton runs."""
    # float32 only in the interpreter: on a GPU tl.dot would round float32 to tf32
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if INTERPRET else ())
    return (weight.dim() == 2 and weight.is_contiguous() and x.dtype == weight.dtype
            and x.dtype in dtypes
            and x.shape[-1] == weight.shape[1] and 0 < x.numel() // x.shape[-1] <= MAX_ROWS
            and x.device == weight.device and available(x.device))


def label(choice) -> str:
    if choice == CUBLAS:
        return CUBLAS
    return "/".join(f"{k}={v}" for k, v in choice.items())


def _run(x2: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, choice) -> None:
    if choice == CUBLAS:
        torch.mm(x2, weight.t(), out=out)
    elif x2.shape[0] == 1:
        gemv(x2.view(-1), weight, out.view(-1), choice)
    else:
        dot(x2, weight, out, choice)


def _time_us(fn, weights: list, dev, reps: int) -> float:
    """Microseconds per call of fn over the weights in turn, replayed as one CUDA graph: the
    runner replays graphs too, and timing plain launches would measure Triton's Python launch
    path (~10-20 us) instead of the kernel."""
    with warming_up(dev):
        for w in weights:
            fn(w)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, dev):
        for i in range(reps):
            fn(weights[i % len(weights)])
    best = float("inf")
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) * 1e3 / reps)
    del graph
    return best


def choose(M: int, weight: torch.Tensor):
    """The fastest of cuBLAS and the bucket's Triton configs for [M rows] x weight^T on this
    device, timed once per (N, K, rows bucket, dtype, device) over enough random weight copies
    that the L2 cannot hold them (a decode step streams every weight from memory once)."""
    N, K = weight.shape
    bucket = rows_bucket(M)
    key = (N, K, bucket, weight.dtype, weight.device)
    if key in _CHOICE:
        return _CHOICE[key]
    dev = weight.device
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return CONFIGS[bucket]  # nothing to time here; not remembered, so a later call tunes
    rows = 1 if bucket == "gemv" else bucket
    nbytes = N * K * weight.element_size()
    copies = max(2, -(-3 * torch.cuda.get_device_properties(dev).L2_cache_size // nbytes))
    weights = [torch.randn(N, K, device=dev, dtype=weight.dtype) for _ in range(copies)]
    x = torch.randn(rows, K, device=dev, dtype=weight.dtype)
    out = torch.empty(rows, N, device=dev, dtype=weight.dtype)
    timings = {}
    best, best_us = CUBLAS, float("inf")
    for choice in [CUBLAS] + CANDIDATES[bucket]:
        try:
            run = lambda w, c=choice: _run(x, w, out, c)  # noqa: E731
            for w in weights[:2]:
                run(w)  # compiles a Triton config
            torch.cuda.synchronize(dev)
            us = _time_us(run, weights, dev, reps=max(2 * copies, 24))
        except Exception as exc:  # a config this GPU cannot run (shared memory): skip it
            timings[label(choice)] = repr(exc)[:120]
            continue
        timings[label(choice)] = round(us, 2)
        if us < best_us:
            best, best_us = choice, us
    del weights
    _CHOICE[key] = best
    _TIMINGS[key] = timings
    return best


def choices() -> list[dict]:
    """What `choose` picked so far, with the timings (for benchmark reports)."""
    return [{"N": k[0], "K": k[1], "rows_bucket": k[2], "dtype": str(k[3]), "choice": label(_CHOICE[k]),
             "us": _TIMINGS.get(k, {})} for k in _CHOICE]


def linear(x: torch.Tensor, weight: torch.Tensor, choice=None) -> torch.Tensor:
    """F.linear(x, weight) without bias, for x of shape [..., K] with at most MAX_ROWS rows (see
    `supports`), by the fastest kernel `choose` found (or the given choice)."""
    lead = x.shape[:-1]
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M, N = x2.shape[0], weight.shape[0]
    if choice is None:
        choice = choose(M, weight)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _run(x2, weight, out, choice)
    return out.view(*lead, N)
