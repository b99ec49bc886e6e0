#!/usr/bin/env python
"""Where a speculative block's host time goes: cProfile of generate, per method.

The setting of bench_engine.py's overhead section (7B-shaped target, 2-layer draft, random bf16
weights, fast mode with compile="parts", L = 4, T = 1), with the default execution (draft levels
as one graph, phases timed by events). For each method, after warm-up: the wall ms per block of
an unprofiled run, then under cProfile the host seconds per block spent waiting in each host
read (`tolist`, by caller: the tree read in `finish`, the verification read in `verify`) and
the rest, and the functions with the most own time. A third run times each CUDA graph launch
on the host, by the function that launches it.

A wait at a read is time the host was ahead of the GPU; the host work between a read and the
next launch is time the GPU idles. cProfile slows Python calls several-fold, so the host times
are upper bounds and only their proportions carry over; bench_block_ab.py measures time.

Usage: python scripts/profile_host.py [--methods sd,spectr,rsd_c,rsd_s] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_engine as B  # noqa: E402  (puts the repo on sys.path)
from rsd_bench.engine import generate  # noqa: E402


def _where(key) -> str:
    file, line, name = key
    return f"{Path(file).name}:{line}({name})" if file != "~" else name


def host_profile(run, blocks: int, top: int) -> dict:
    """Profile one call of run(); host seconds per block by read and by function."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # key -> (calls, primitive calls, own time, cumulative, callers)
    total = sum(v[2] for v in stats.values())
    reads = {}
    for key, (_, _, own, _, callers) in stats.items():
        if key[2] == "<method 'tolist' of 'torch._C.TensorBase' objects>":
            for caller, (_, _, t, _) in callers.items():
                reads[_where(caller)] = reads.get(_where(caller), 0.0) + t
    waits = sum(reads.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "profiled_host_ms_per_block": round(1e3 * total / blocks, 4),
        "read_wait_ms_per_block": {k: round(1e3 * t / blocks, 4) for k, t in reads.items()},
        "other_host_ms_per_block": round(1e3 * (total - waits) / blocks, 4),
        "top_own_time": [{"function": _where(k), "calls_per_block": round(v[0] / blocks, 2),
                          "own_ms_per_block": round(1e3 * v[2] / blocks, 4),
                          "cumulative_ms_per_block": round(1e3 * v[3] / blocks, 4)} for k, v in rows],
    }


class ReplayClock:
    """Host time of each CUDA graph launch (CUDAGraph.replay), by the function that replays it:
    a launch that blocks the host (e.g. a full launch queue) delays the work behind it."""

    def __init__(self):
        self.us: dict[str, list[float]] = {}
        self._real = torch.cuda.CUDAGraph.replay

    def __enter__(self):
        real, us = self._real, self.us

        def replay(graph):
            caller = sys._getframe(1)
            key = f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}"
            t0 = time.perf_counter()
            real(graph)
            us.setdefault(key, []).append((time.perf_counter() - t0) * 1e6)

        torch.cuda.CUDAGraph.replay = replay
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.replay = self._real

    def summary(self, blocks: int) -> dict:
        return {k: {"calls_per_block": round(len(v) / blocks, 2), "median_us": round(sorted(v)[len(v) // 2], 2),
                    "us_per_block": round(sum(v) / blocks, 2)} for k, v in self.us.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="sd,spectr,rsd_c,rsd_s")
    p.add_argument("--L", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (tests the plumbing)")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "profile_host.json"))
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    context = 24 if a.quick else 512
    new_tokens = min(a.new_tokens, 8) if a.quick else a.new_tokens
    target, draft, prompt, vocab = B.overhead_pair(dev, a.quick, context, context + new_tokens + 256)
    report = {"device": B.gpu_name(dev), "torch": torch.__version__, "L": a.L, "new_tokens": new_tokens,
              "results": []}
    for method in B._names(a.methods):
        def run(n=new_tokens, method=method):
            return generate(target, draft, prompt, method, a.L, vocab_size=vocab, max_new_tokens=n, seed=0)

        run(16)  # captures and compiles
        run(16)
        B.sync(dev)
        t0 = time.perf_counter()
        res = run()
        B.sync(dev)
        wall = time.perf_counter() - t0
        row = {"method": method, "blocks": res.target_calls, "block_efficiency": res.block_efficiency,
               "wall_ms_per_block": round(1e3 * wall / res.target_calls, 4),
               **host_profile(lambda: (run(), B.sync(dev)), res.target_calls, a.top)}
        with ReplayClock() as clock:  # a third run: the launches' host time, without cProfile
            run()
            B.sync(dev)
        row["graph_launch_host"] = clock.summary(res.target_calls)
        report["results"].append(row)
        print(f"{method:7s} wall {row['wall_ms_per_block']:.3f} ms/block; profiled host "
              f"{row['profiled_host_ms_per_block']:.3f} ms/block: reads wait {row['read_wait_ms_per_block']}, "
              f"other {row['other_host_ms_per_block']:.3f}; graph launches {row['graph_launch_host']}", flush=True)
        Path(a.out).write_text(json.dumps(report, indent=1))  # after every method: a kill keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main())
