"""Time the linear layers of a decode step: cuBLAS (F.linear) against rsd_bench.skinny_matmul.

One GPU call (a few minutes) answers three questions and writes JSON:
1. per weight shape of a Llama-2-7B/13B layer and rows M in 1/4/16/64: microseconds and GB/s of
   F.linear and of each Triton launch configuration (the sweep that picked skinny_matmul.CONFIGS);
2. whether fusing q/k/v and gate/up into one weight each pays (fewer, larger reads);
3. the matmuls of a whole 7B / 13B step in one CUDA graph (every layer's weights distinct, so
   nothing is served from L2): cuBLAS with separate weights, cuBLAS fused, Triton fused, against
   the weight-streaming floor measured with a device-to-device copy in the same run.

Timing: each measurement captures R calls in one CUDA graph over enough distinct weight copies
to exceed the L2 several times, replays it 7 times and keeps the median per call.

    python scripts/bench_matmul.py --out $OUT/matmul.json [--shapes 7b,13b] [--rows 1,4,16,64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rsd_bench import skinny_matmul as sm  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, vocab
    "7b": (4096, 11008, 32, 32000),
    "13b": (5120, 13824, 40, 32000),
}
GEMV_SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
              for bn, bk, w, s in itertools.product((4, 8, 16), (512, 1024), (4, 8), (1, 3))]
DOT_SWEEP = {bm: [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=s)
                  for bn, bk, s in itertools.product((32, 64), (128, 256), (3, 5))]
             for bm in (16, 64)}


def log(msg: str) -> None:
    print(msg, flush=True)


def copy_bandwidth(dev, mib: int = 2048, reps: int = 10) -> float:
    n = mib * 2**20 // 2
    a = torch.randn(n, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        b.copy_(a)
    e.record()
    e.synchronize()
    sec = s.elapsed_time(e) / 1e3 / reps
    del a, b
    return 2 * n * 2 / sec  # bytes read + written per second


def time_calls(fn_list, dev, replays: int = 7) -> float:
    """Median seconds per call of the callables, captured together in one CUDA graph."""
    for fn in fn_list[: min(4, len(fn_list))]:
        fn()  # compile / autotune outside the capture
    torch.cuda.synchronize(dev)
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        for fn in fn_list:
            fn()
    torch.cuda.current_stream(dev).wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fn_list:
            fn()
    g.replay()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(fn_list))
    del g
    return statistics.median(times)


def shape_table(hidden: int, inter: int, vocab: int) -> dict:
    return {"q/k/v/o": (hidden, hidden), "qkv fused": (3 * hidden, hidden), "gate/up": (inter, hidden),
            "gate_up fused": (2 * inter, hidden), "down": (hidden, inter), "lm_head": (vocab, hidden)}


def bench_shape(name, N, K, rows, dev, dtype, budget_end) -> dict:
    nbytes = N * K * 2
    copies = max(4, math.ceil(1.5e9 / nbytes))
    ws = [torch.randn(N, K, dtype=dtype, device=dev) / math.sqrt(K) for _ in range(copies)]
    out = {"N": N, "K": K, "weight_bytes": nbytes, "copies": copies, "rows": {}}
    for m in rows:
        x = torch.randn(m, K, dtype=dtype, device=dev)
        y = torch.empty(m, N, dtype=dtype, device=dev)
        ref = F.linear(x, ws[0])
        r = {}
        t = time_calls([lambda w=w: torch.mm(x, w.t(), out=y) for w in ws], dev)
        r["cublas_us"] = t * 1e6
        r["cublas_gbs"] = nbytes / t / 1e9
        sweep = GEMV_SWEEP if m == 1 else DOT_SWEEP[16 if m <= 16 else 64]
        tried = []
        for cfg in sweep:
            if time.time() > budget_end:
                r["partial"] = "budget"
                break
            if m == 1 and cfg["BLOCK_N"] * cfg["BLOCK_K"] > 32 * cfg["num_warps"] * 128:
                continue  # more than 128 float32 partial sums per thread: spills
            try:
                run = (lambda w, cfg=cfg: sm.gemv(x.view(-1), w, y.view(-1), cfg)) if m == 1 else \
                      (lambda w, cfg=cfg: sm.dot(x, w, y, cfg))
                run(ws[0])
                err = float((y.float() - ref.float()).norm() / ref.float().norm())
                t = time_calls([lambda w=w, run=run: run(w) for w in ws], dev)
                tried.append({"cfg": cfg, "us": t * 1e6, "gbs": nbytes / t / 1e9, "rel_err": err})
            except Exception as exc:  # a config that does not compile (shared memory, registers)
                tried.append({"cfg": cfg, "error": repr(exc)[:200]})
        ok = [c for c in tried if "us" in c]
        r["triton_sweep"] = tried
        if ok:
            ok.sort(key=lambda c: c["us"])
            best = ok[0]
            r["triton_best"] = best
            r["triton_top3"] = ok[:3]
            log(f"  {name:14s} N={N:6d} K={K:6d} M={m:3d}: cuBLAS {r['cublas_us']:8.1f} us "
                f"{r['cublas_gbs']:6.0f} GB/s | Triton best {best['us']:8.1f} us {best['gbs']:6.0f} GB/s "
                f"err {best['rel_err']:.1e} " + " | ".join(
                    f"{c['us']:.1f} " + "/".join(str(v) for v in c["cfg"].values()) for c in ok[:3]))
        out["rows"][m] = r
    del ws
    torch.cuda.empty_cache()
    return out


def bench_chain(key, dev, dtype, rows, bw) -> dict:
    """The matmuls of one whole step: every layer's weights, one CUDA graph per variant."""
    hidden, inter, layers, vocab = SHAPES[key]
    layer_w = [dict(qkv=torch.randn(3 * hidden, hidden, dtype=dtype, device=dev) * 0.02,
                    o=torch.randn(hidden, hidden, dtype=dtype, device=dev) * 0.02,
                    gate_up=torch.randn(2 * inter, hidden, dtype=dtype, device=dev) * 0.02,
                    down=torch.randn(hidden, inter, dtype=dtype, device=dev) * 0.02) for _ in range(layers)]
    head = torch.randn(vocab, hidden, dtype=dtype, device=dev) * 0.02
    streamed = sum(w.numel() * 2 for lw in layer_w for w in lw.values()) + head.numel() * 2
    floor = streamed / bw
    res = {"streamed_weight_bytes": streamed, "floor_ms": floor * 1e3, "rows": {}}
    for m in rows:
        xh = torch.randn(m, hidden, dtype=dtype, device=dev)
        xi = torch.randn(m, inter, dtype=dtype, device=dev)

        def lin_cublas(x, w):
            return F.linear(x, w)

        def lin_tuned(x, w):  # what the runner uses: the fastest of cuBLAS and Triton per shape
            return sm.linear(x, w)

        def step(lin, fused):
            def run():
                for lw in layer_w:
                    if fused:
                        lin(xh, lw["qkv"])
                    else:
                        for i in range(3):
                            lin(xh, lw["qkv"][i * hidden:(i + 1) * hidden])
                    lin(xh, lw["o"])
                    if fused:
                        lin(xh, lw["gate_up"])
                    else:
                        lin(xh, lw["gate_up"][:inter])
                        lin(xh, lw["gate_up"][inter:])
                    lin(xi, lw["down"])
                lin(xh, head)
            return run

        r = {}
        for name, lin, fused in (("cublas_separate", lin_cublas, False), ("cublas_fused", lin_cublas, True),
                                 ("tuned_separate", lin_tuned, False), ("tuned_fused", lin_tuned, True)):
            if m > sm.MAX_ROWS and name.startswith("tuned"):
                continue
            t = time_calls([step(lin, fused)], dev, replays=9)
            r[name] = {"ms": t * 1e3, "fraction_of_floor": floor / t}
        res["rows"][m] = r
        log(f"  chain {key} M={m}: " + ", ".join(f"{k} {v['ms']:.3f} ms ({v['fraction_of_floor']:.0%})"
                                               for k, v in r.items()) + f"; floor {floor*1e3:.3f} ms")
    del layer_w, head
    torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b,13b")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--chain-rows", default="1,16")
    ap.add_argument("--budget-seconds", type=float, default=420.0, help="stop sweeping configs after this")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    t0 = time.time()
    end = t0 + a.budget_seconds
    rows = [int(r) for r in a.rows.split(",")]
    report = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "triton": getattr(sm.triton, "__version__", None)}
    bw = copy_bandwidth(dev)
    report["copy_bandwidth_gb_per_s"] = bw / 1e9
    log(f"{report['gpu']}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    report["shapes"] = {}
    report["chains"] = {}
    for key in a.shapes.split(","):
        hidden, inter, layers, vocab = SHAPES[key]
        report["shapes"][key] = {}
        for name, (N, K) in shape_table(hidden, inter, vocab).items():
            r = bench_shape(name, N, K, rows, dev, dtype, end)
            report["shapes"][key][name] = r
        report["chains"][key] = bench_chain(key, dev, dtype, [int(r) for r in a.chain_rows.split(",")], bw)
    report["tuned_choices"] = sm.choices()
    report["seconds"] = time.time() - t0
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    log(f"done in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
