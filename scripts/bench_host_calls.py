#!/usr/bin/env python
"""Host microseconds per call of the CUDA primitives a speculative block issues several times.

A block's host work is a few dozen such calls (profile_host.py counts them); where the GPU waits
for the host, each microsecond here is a microsecond of the block. Measured back to back on an
idle GPU, median of --repeats timings of --calls calls each. Also times lm.Stopwatch.switch.
Usage: python scripts/bench_host_calls.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rsd_bench.lm import Stopwatch  # noqa: E402


def per_call_us(fn, calls: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "bench_host_calls.json"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 1
    dev = torch.device("cuda")
    stream = torch.cuda.current_stream(dev)
    event = torch.cuda.Event()
    timed = torch.cuda.Event(enable_timing=True)
    x = torch.zeros(4096, device=dev)
    pinned = torch.zeros(3, dtype=torch.long, pin_memory=True)
    small = torch.zeros(3, dtype=torch.long, device=dev)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(stream)
    with torch.cuda.stream(s):
        x.add_(1)
    stream.wait_stream(s)
    with torch.cuda.graph(graph):
        x.add_(1)
    watch = Stopwatch(dev)
    watch.events, watch._stream = True, stream  # the event clock, whatever RSD_BENCH_PHASE_SYNC says
    phases = iter(["draft", "verify", "overhead"] * (a.calls * a.repeats + 10))
    calls = {
        "torch.cuda.current_stream(dev)": lambda: torch.cuda.current_stream(dev),
        "Event.record() (looks the stream up)": lambda: event.record(),
        "Event.record(stream) (stream given)": lambda: event.record(stream),
        "Event(enable_timing=True) + record(stream)": lambda: torch.cuda.Event(enable_timing=True).record(stream),
        "Stopwatch.switch (events)": lambda: watch.switch(next(phases)),
        "timed Event.record() (looks the stream up)": lambda: timed.record(),
        "CUDAGraph.replay (one kernel)": graph.replay,
        "copy_ 3 longs pinned -> device, non_blocking": lambda: small.copy_(pinned, non_blocking=True),
        "uniform_ on 4096 floats": lambda: x.uniform_(),
    }
    got = {}
    for name, fn in calls.items():
        fn()
        got[name] = round(per_call_us(fn, a.calls, a.repeats), 3)
        print(f"{got[name]:8.2f} us  {name}", flush=True)
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "calls": a.calls,
              "repeats": a.repeats, "us_per_call": got}
    Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
