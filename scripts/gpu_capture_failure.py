#!/usr/bin/env python
"""A CUDA graph capture that fails leaves the run as it was: the stream, the tokens, the timings.

A method's level function (or a verifier) that reads a value on the host cannot be captured.
The engine then runs it without a graph, with a warning. torch's capture context does not
restore the caller's stream when the capture fails, so rsd_bench captures through
`device_graph.capturing`, which does. A warm-up just before each capture makes host reads raise
(`device_graph.no_host_sync`), so such a function fails before any capture: a failed capture
leaves torch's default CUDA generator in capture mode. Checked on a GPU with the tiny models:
1. SpecTr with a level function that reads on the host inside the draft levels graph: the same
   tokens as level by level, the stream and the default generator unchanged, and decode seconds
   within 2x of the level run's (phase events on a stream the work has left would read nonsense);
2. a `graphed` function that reads on the host: it runs plainly, on the caller's stream;
3. `capturing` around a body that reads on the host: the current stream is unchanged afterwards.
Writes JSON to $OUT/gpu_capture_failure.json; exit status 1 on a failed check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rsd_bench.device_graph import UniformPool, capturing, graphed  # noqa: E402
from rsd_bench.engine import generate  # noqa: E402
from rsd_bench.graphed_lm import GraphedRunner  # noqa: E402
from rsd_bench.methods import chains  # noqa: E402
from rsd_bench.tiny_models import tiny_llama  # noqa: E402


def rng_usable(dev) -> bool:
    try:
        torch.randn(4, device=dev)
        return True
    except RuntimeError:
        return False


def main() -> int:
    dev = torch.device("cuda")
    checks = {}
    before = torch.cuda.current_stream(dev)
    target = tiny_llama(seed=0).to(dev)
    draft = tiny_llama(seed=0).to(dev)
    with torch.no_grad():  # a close draft, so blocks accept several tokens
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())

    # 1. the engine: SpecTr whose level function reads on the host inside the draft levels graph
    real = chains.chain_level

    def syncing_level(probs, rep, gen):
        if isinstance(gen, UniformPool):  # inside the draft levels graph's body
            float(probs.sum().item())
            return real.fn(probs, rep, gen=gen)
        return real(probs, rep, gen=gen)

    runs = {}
    for name in ("levels", "graph"):
        t, d = GraphedRunner(target, capacity=512), GraphedRunner(draft, capacity=512)
        d.fuse_draft_levels = name == "graph"
        chains.chain_level = syncing_level
        try:
            kw = dict(vocab_size=259, max_new_tokens=40, timing=True, K=3)
            generate(t, d, [1, 40, 50, 60], "spectr", 3, seed=0, **kw)  # captures (and the failure)
            runs[name] = generate(t, d, [1, 40, 50, 60], "spectr", 3, seed=1, **kw)
        finally:
            chains.chain_level = real
        if name == "graph":
            checks["draft_graph_fell_back"] = list(d.draft_graphs.values()) == [False]
    a, b = runs["levels"], runs["graph"]
    checks["same_tokens"] = a.tokens == b.tokens
    checks["run_keeps_stream"] = torch.cuda.current_stream(dev) == before
    checks["run_keeps_default_rng"] = rng_usable(dev)
    ratio = b.decode_seconds / a.decode_seconds
    checks["decode_seconds_ratio"] = round(ratio, 3)
    checks["timings_sane"] = 0.5 <= ratio <= 2.0

    # 2. a graphed function that reads on the host: it runs plainly
    x = torch.ones(8, device=dev)

    @graphed
    def syncing(t, gen):
        return t * float(t.sum().item())

    out = syncing(x, gen=torch.Generator(device=dev).manual_seed(0))
    checks["graphed_falls_back"] = bool(syncing.entries) and all(e is False for e in syncing.entries.values())
    checks["graphed_result"] = bool(torch.equal(out, x * 8.0))
    checks["graphed_keeps_stream"] = torch.cuda.current_stream(dev) == before
    checks["graphed_keeps_default_rng"] = rng_usable(dev)

    # 3. last, since it may break the default generator: a capture that fails inside `capturing`
    try:
        with capturing(torch.cuda.CUDAGraph(), dev):
            (x * 2).sum().item()  # a host read: illegal while capturing
        checks["capturing_raised"] = False
    except Exception:
        checks["capturing_raised"] = True
    checks["capturing_keeps_stream"] = torch.cuda.current_stream(dev) == before
    # not a check: whether torch's default generator survives a failed capture (the reason the
    # warm-ups forbid host reads, so that failures happen before any capture)
    checks["info_default_rng_after_failed_capture"] = "usable" if rng_usable(dev) else "broken"

    failed = [k for k, v in checks.items() if v is False]
    print(checks, flush=True)
    print("all pass" if not failed else f"FAILED: {failed}", flush=True)
    out = Path(os.environ.get("OUT", ".")) / "gpu_capture_failure.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "checks": checks, "failed": failed}, indent=1))
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
