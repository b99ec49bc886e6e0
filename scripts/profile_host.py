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
next launch is time the GPU idles. A fourth run (`TurnaroundClock`, no cProfile) times that
turnaround per block on the host: from the verification read's return to the root draft call's
launch, on to the draft levels graph's launch and to the target call's launch, with each
launch's GPU time (events around the replay) beside it. cProfile slows Python calls several-fold, so the host times
are upper bounds and only their proportions carry over; bench_block_ab.py measures time.

Usage: python scripts/profile_host.py [--methods sd,spectr,rsd_c,rsd_s] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
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


class TurnaroundClock:
    """Host timestamps of the verification read's return (verify.GraphedDecide.__call__) and of
    every CUDA graph launch, with events around each launch for its GPU time. Per block: host
    us from the read to the root draft call's launch (graphed_lm `_run_bucket`), from there to
    the draft levels' launch (draft_graph `replay`) and to the target call's (`forward_rows`).
    While the host works through the first two the GPU has at most the draft's compaction, the
    root forward and its softmax to run: the rest of that host time is GPU idle time."""

    def __init__(self):
        from rsd_bench import verify

        self.log: list[tuple] = []  # (what, host s, start event, end event)
        self._replay, self._decide, self._verify = torch.cuda.CUDAGraph.replay, verify.GraphedDecide.__call__, verify

    def __enter__(self):
        replay, decide, log = self._replay, self._decide, self.log

        def timed_replay(graph):
            caller = sys._getframe(1).f_code.co_name
            t = time.perf_counter()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            replay(graph)
            b.record()
            log.append((caller, t, a, b))

        def timed_decide(obj, *args, **kwargs):
            out = decide(obj, *args, **kwargs)
            log.append(("read", time.perf_counter(), None, None))
            return out

        torch.cuda.CUDAGraph.replay = timed_replay
        self._verify.GraphedDecide.__call__ = timed_decide
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.replay = self._replay
        self._verify.GraphedDecide.__call__ = self._decide

    def summary(self) -> dict:
        torch.cuda.synchronize()
        steps = {"read_to_root_launch": [], "root_to_levels_launch": [], "levels_to_target_launch": []}
        gpu = {"root_forward": [], "levels_graph": []}
        order = ("read", "_run_bucket", "replay", "forward_rows")
        for i, (what, t, _, _) in enumerate(self.log):
            if what != "read":
                continue
            seq = self.log[i : i + 4]
            if tuple(s[0] for s in seq) != order:
                continue  # the last block, or a block drafted otherwise
            (_, t0, _, _), (_, t1, a1, b1), (_, t2, a2, b2), (_, t3, _, _) = seq
            steps["read_to_root_launch"].append(1e6 * (t1 - t0))
            steps["root_to_levels_launch"].append(1e6 * (t2 - t1))
            steps["levels_to_target_launch"].append(1e6 * (t3 - t2))
            gpu["root_forward"].append(1e3 * a1.elapsed_time(b1))
            gpu["levels_graph"].append(1e3 * a2.elapsed_time(b2))
        med = lambda v: round(statistics.median(v), 1) if v else None  # noqa: E731
        return {"blocks": len(steps["read_to_root_launch"]),
                "host_us_median": {k: med(v) for k, v in steps.items()},
                "gpu_us_median": {k: med(v) for k, v in gpu.items()}}


class HostTimeline:
    """Host timestamps on entry to and exit from the engine's functions between the verification
    read and the target call's launch; per block, each step's median offset from the read (us).
    Shows where the host spends the turnaround that the GPU idles through."""

    def __init__(self):
        from rsd_bench import draft_graph, engine, graphed_lm, lm, sampling, device_graph

        self.where = [(engine, "walk"), (engine, "to_probs"), (engine._DraftSession, "__init__"),
                      (engine._DraftSession, "__call__"), (engine._DraftSession, "grow"),
                      (engine._DraftSession, "_levels_graph"), (engine._DraftSession, "keep"),
                      (engine._DraftSession, "read_rows"), (engine._DraftSession, "finish"),
                      (graphed_lm.GraphedRunner, "keep"), (graphed_lm.GraphedRunner, "forward"),
                      (graphed_lm.GraphedRunner, "_pack"), (graphed_lm.GraphedRunner, "_run_bucket"),
                      (graphed_lm.GraphedRunner, "forward_rows"), (draft_graph.DraftLevelsGraph, "replay"),
                      (draft_graph.DraftLevelsGraph, "_inputs"), (device_graph.UniformPool, "refill"),
                      (lm.Stopwatch, "switch"), (torch.cuda.CUDAGraph, "replay")]
        self.log: list[tuple[str, float]] = []
        self._saved = [(obj, name, getattr(obj, name)) for obj, name in self.where]
        self._verify = __import__("rsd_bench.verify", fromlist=["GraphedDecide"])
        self._decide = self._verify.GraphedDecide.__call__

    def __enter__(self):
        log, clock = self.log, time.perf_counter

        def wrap(fn, name):
            def wrapped(*args, **kwargs):
                log.append((name + ">", clock()))
                out = fn(*args, **kwargs)
                log.append(("<" + name, clock()))
                return out
            return wrapped

        for obj, name, fn in self._saved:
            setattr(obj, name, wrap(fn, f"{getattr(obj, '__name__', obj)}.{name}"))
        decide = self._decide

        def timed_decide(obj, *args, **kwargs):
            out = decide(obj, *args, **kwargs)
            log.append(("READ", clock()))
            return out

        self._verify.GraphedDecide.__call__ = timed_decide
        return self

    def __exit__(self, *exc):
        for obj, name, fn in self._saved:
            setattr(obj, name, fn)
        self._verify.GraphedDecide.__call__ = self._decide

    def summary(self) -> list:
        blocks = []
        for i, (what, t0) in enumerate(self.log):
            if what != "READ":
                continue
            steps = []
            for what2, t in self.log[i + 1 :]:
                if what2 == "READ":
                    break
                steps.append((what2, 1e6 * (t - t0)))
                if what2 == "<GraphedRunner.forward_rows":
                    blocks.append(steps)
                    break
        if not blocks:
            return []
        names = [tuple(n for n, _ in b) for b in blocks]
        modal = max(set(names), key=names.count)
        same = [b for b, n in zip(blocks, names) if n == modal]
        return [{"step": name, "us_after_read": round(statistics.median(b[j][1] for b in same), 1)}
                for j, name in enumerate(modal)] + [{"blocks": len(same), "of": len(blocks)}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="sd,spectr,rsd_c,rsd_s")
    p.add_argument("--L", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (tests the plumbing)")
    p.add_argument("--turnaround-only", action="store_true", help="only the TurnaroundClock run, no cProfile")
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
               "wall_ms_per_block": round(1e3 * wall / res.target_calls, 4)}
        if not a.turnaround_only:
            row.update(host_profile(lambda: (run(), B.sync(dev)), res.target_calls, a.top))
            with ReplayClock() as clock:  # a third run: the launches' host time, without cProfile
                run()
                B.sync(dev)
            row["graph_launch_host"] = clock.summary(res.target_calls)
            print(f"{method:7s} wall {row['wall_ms_per_block']:.3f} ms/block; profiled host "
                  f"{row['profiled_host_ms_per_block']:.3f} ms/block: reads wait {row['read_wait_ms_per_block']}, "
                  f"other {row['other_host_ms_per_block']:.3f}; graph launches {row['graph_launch_host']}", flush=True)
        if dev.type == "cuda":
            with TurnaroundClock() as clock:  # a fourth run: the turnaround after the verification read
                run()
                B.sync(dev)
            row["turnaround"] = clock.summary()
            print(f"{method:7s} turnaround {row['turnaround']}", flush=True)
            with HostTimeline() as line:  # a fifth: where the turnaround's host time goes
                run()
                B.sync(dev)
            row["host_timeline"] = line.summary()
            print(f"{method:7s} host timeline after the verification read (us):", flush=True)
            for step in row["host_timeline"]:
                print("    ", step, flush=True)
        report["results"].append(row)
        Path(a.out).write_text(json.dumps(report, indent=1))  # after every method: a kill keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main())
