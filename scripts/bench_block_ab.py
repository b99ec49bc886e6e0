#!/usr/bin/env python
"""Per-block cost of the engine's execution options, A/B in one process, calls interleaved.

The options: a block's draft levels as one CUDA graph (`fuse_draft_levels`, draft_graph) or
level by level; phase timing by CUDA events or by a synchronization at each phase switch
(RSD_BENCH_PHASE_SYNC, lm.Stopwatch); and the target call queued from the draft's rows on the
device before the host reads them (`target_from_rows`, runner.forward_rows) or sent from the
host-built tree after the read (the variants without "+rows"). The setting is bench_engine's
overhead section: a 7B-shaped random bf16 target and a 2-layer random draft in fast mode
(compile="parts"), L = 4.

Separate processes on the lent VMs scatter by 5-10 points of the timeline share (BENCHMARKS.md
00a, 00b), more than these options change. Here every round runs each variant once, in a
rotating order, in one process on the same runners, so the variants share the VM's state.

Per variant and method: wall ms per block (perf_counter around generate after a
synchronization, the prefill included: it is the same for every variant), the engine's decode
ms per block, and the timeline share outside forwards (bench_engine.ForwardEvents, a separate
call each round). The fast runner marks each forward's span after it has packed the call; the
share with spans marked before the packing, as until the ninth session, is reported beside it.
The time outside forwards is split by engine phase: draft (the draft phase less the draft
forwards; without "+rows" the tree read and the host's tree building after it included),
verify (to the target forward's end, less that forward: the target call's mask, packing and
launch, and with "+rows" the tree read and building, which overlap the target forward) and
overhead (verification, walk and cache compaction, all outside forwards). Medians over the
rounds, and every value. Writes JSON (--out).
Usage: python scripts/bench_block_ab.py [--rounds 6] [--new-tokens 256] [--methods sd,rsd_s]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_engine as B  # noqa: E402  (puts the repo on sys.path)
from rsd_bench.engine import generate  # noqa: E402

VARIANTS = {  # name -> (draft levels as one graph, phase timing by events, target call from the rows)
    "levels+sync": (False, False, False), "graph+sync": (True, False, False),
    "levels+events": (False, True, False), "graph+events": (True, True, False),
    "graph+events+rows": (True, True, True),
}
DEFAULT_VARIANTS = "levels+sync,graph+events,graph+events+rows"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--methods", default="sd,spectr,rsd_c,rsd_s")
    p.add_argument("--L", type=int, default=4)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (tests the plumbing)")
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "bench_block_ab.json"))
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if a.quick:
        a.context, a.new_tokens = min(a.context, 24), min(a.new_tokens, 8)
    target, draft, prompt, vocab = B.overhead_pair(dev, a.quick, a.context, a.context + a.new_tokens + 64 + 128 + 64)
    variants = [v for v in B._names(a.variants)]
    report = {"device": B.gpu_name(dev), "torch": torch.__version__, "L": a.L, "new_tokens": a.new_tokens,
              "rounds": a.rounds, "variants": {v: dict(zip(("graph", "events", "rows"), VARIANTS[v])) for v in variants},
              "results": []}

    def run(method, variant, timeline=False, new_tokens=None):
        graph, events, rows = VARIANTS[variant]
        draft.fuse_draft_levels = graph
        target.target_from_rows = rows
        os.environ["RSD_BENCH_PHASE_SYNC"] = "0" if events else "1"
        t, d = (B.ForwardEvents(target, dev), B.ForwardEvents(draft, dev)) if timeline else (target, draft)
        B.sync(dev)
        t0 = time.perf_counter()
        res = generate(t, d, prompt, method, a.L, vocab_size=vocab, temperature=1.0,
                       max_new_tokens=new_tokens or a.new_tokens, seed=0)
        B.sync(dev)
        wall = time.perf_counter() - t0
        if timeline:
            t_fwd, d_fwd = t.seconds(), d.seconds()  # each synchronizes and reads its events
            host_marked = t.host_marked_seconds() + d.host_marked_seconds()
            # every forward must be marked, the graph's draft levels included (the prefills are not)
            marked, ran = t.calls + d.calls, res.target_calls + res.draft_calls
            if abs(ran - marked) > 2:
                raise RuntimeError(f"{variant}: {marked} forwards marked of {ran}: the timeline misses some")
            blocks = res.target_calls
            phases = {  # ms per block outside forwards, by phase: where the time goes
                "draft": (res.draft_seconds - d_fwd) / blocks * 1e3,
                "verify": (res.verify_seconds - t_fwd) / blocks * 1e3,
                "overhead": res.overhead_seconds / blocks * 1e3}
            dec = res.decode_seconds
            return (dec - t_fwd - d_fwd) / dec, phases, (dec - host_marked) / dec
        return wall / res.target_calls * 1e3, res.decode_seconds / res.target_calls * 1e3, res.block_efficiency

    saved = os.environ.get("RSD_BENCH_PHASE_SYNC")
    try:
        measure(a, run, variants, report)
    finally:  # run() sets it per call
        if saved is None:
            os.environ.pop("RSD_BENCH_PHASE_SYNC", None)
        else:
            os.environ["RSD_BENCH_PHASE_SYNC"] = saved
    return 0


def measure(a, run, variants, report) -> None:
    for method in B._names(a.methods):
        for v in variants:  # warm-up: captures and compiles of every variant, outside the rounds
            run(method, v, new_tokens=16)
            run(method, v, timeline=True, new_tokens=16)
        got = {v: {"wall_ms_per_block": [], "decode_ms_per_block": [], "timeline_outside": [],
                   "timeline_outside_host_marked": [], "outside_ms_per_block_by_phase": []} for v in variants}
        for r in range(a.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate the order
            for v in order:
                wall, dec, eff = run(method, v)
                got[v]["wall_ms_per_block"].append(round(wall, 4))
                got[v]["decode_ms_per_block"].append(round(dec, 4))
                got[v]["block_efficiency"] = eff
                share, phases, share_host = run(method, v, timeline=True)
                got[v]["timeline_outside"].append(round(share, 4))
                got[v]["timeline_outside_host_marked"].append(round(share_host, 4))
                got[v]["outside_ms_per_block_by_phase"].append({k: round(x, 4) for k, x in phases.items()})
        row = {"method": method, "variants": got}
        for v, g in got.items():
            g["median"] = {k: statistics.median(g[k]) for k in ("wall_ms_per_block", "decode_ms_per_block",
                                                                 "timeline_outside", "timeline_outside_host_marked")}
            g["median"]["outside_ms_per_block_by_phase"] = {
                k: statistics.median(x[k] for x in g["outside_ms_per_block_by_phase"])
                for k in ("draft", "verify", "overhead")}
            m = g["median"]
            print(f"{method:7s} {v:18s} wall {m['wall_ms_per_block']:.3f} ms/block  decode {m['decode_ms_per_block']:.3f}"
                  f"  timeline outside {100 * m['timeline_outside']:.1f}% "
                  f"(host-marked {100 * m['timeline_outside_host_marked']:.1f}%), ms/block by phase "
                  + " ".join(f"{k} {x:.3f}" for k, x in m["outside_ms_per_block_by_phase"].items())
                  + f"  (walls {g['wall_ms_per_block']})", flush=True)
        report["results"].append(row)
        Path(a.out).write_text(json.dumps(report, indent=1))  # after every method: a kill keeps the rest


if __name__ == "__main__":
    sys.exit(main())
