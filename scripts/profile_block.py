"""Where a speculative block's time goes on the GPU: kernels by name, per block, under torch.profiler.

The setting of bench_engine.py's overhead section (7B-shaped target, 2-layer draft, random bf16
weights, fast mode with compile="parts", L = 4, T = 1). For each method: GPU kernel time per
block, split into the model forwards' kernels and everything else, the largest non-forward
kernels, and the wall time per block, so (wall - kernel time) is the GPU's idle time per block.
Kernels inside CUDA graph replays cannot be traced back to the Python call that launched the graph,
so a forward is recognised by its kernels' names (FORWARD_HINTS): a heuristic, good enough to
find the costly kernels outside the forwards. The profiler slows the host, so the profiled wall
time (and the GPU idle time derived from it) is an upper bound; bench_engine.py measures time.

Usage: python scripts/profile_block.py [methods, comma-separated] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_engine import SHAPES, _dev_time, build_random_llama  # noqa: E402
from rsd_bench.engine import generate  # noqa: E402
from rsd_bench.graphed_lm import GraphedRunner  # noqa: E402

# substrings of kernel names that belong to a model forward: skinny_matmul's kernels, cuBLAS,
# attention, the fused RMSNorm / rotary / SiLU kernels of compile="parts", the cache writes, the
# embedding, and any kernel named for bf16 (the sampling math runs in float32 / float64)
FORWARD_HINTS = ("_dot_kernel", "_split_kernel", "_combine_kernel", "gemv", "gemm", "cutlass", "sm90",
                 "flash", "fmha", "attention", "attn", "rsd_tree", "rsqrt", "cat_mul_neg_slice", "silu",
                 "write_kv", "embedding", "nvjet", "splitk", "bfloat16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="?", default="sd,spectr,rsd_c,rsd_s")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_block.json"))
    a = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    vocab = SHAPES["7b"]["vocab"]
    target = GraphedRunner(build_random_llama(SHAPES["7b"], dtype, dev, 7), vocab_size=vocab, capacity=1024,
                           compile="parts")
    draft = GraphedRunner(build_random_llama(SHAPES["draft"], dtype, dev, 68), vocab_size=vocab, capacity=1024,
                          compile="parts")
    target.capture(32)
    draft.capture(32)
    prompt = torch.randint(3, vocab, (512,), generator=torch.Generator().manual_seed(2)).tolist()
    common = dict(vocab_size=vocab, temperature=1.0, top_p=None)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "L": 4, "results": []}
    for name in a.methods.split(","):
        generate(target, draft, prompt, name, 4, max_new_tokens=a.tokens, seed=1, **common)  # captures, compiles
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = generate(target, draft, prompt, name, 4, max_new_tokens=a.tokens, seed=0, timing=False, **common)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        blocks = res.target_calls
        kernels = [e for e in prof.key_averages() if _dev_time(e) > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
        rows = sorted(({"kernel": e.key[:120], "calls_per_block": round(e.count / blocks, 2),
                        "us_per_block": round(_dev_time(e) / blocks, 1),
                        "forward": any(h in e.key.lower() for h in FORWARD_HINTS)} for e in kernels),
                      key=lambda r: -r["us_per_block"])
        fwd = sum(r["us_per_block"] for r in rows if r["forward"])
        other = sum(r["us_per_block"] for r in rows if not r["forward"])
        row = {"method": name, "blocks": blocks, "wall_us_per_block_profiled": round(wall / blocks * 1e6, 1),
               "forward_kernels_us_per_block": round(fwd, 1), "other_kernels_us_per_block": round(other, 1),
               "gpu_idle_us_per_block": round(wall / blocks * 1e6 - fwd - other, 1),
               "other_kernels": [r for r in rows if not r["forward"]][:25],
               "forward_kernels_top": [r for r in rows if r["forward"]][:8]}
        out["results"].append(row)
        print(f"{name}: {row['wall_us_per_block_profiled']:.0f} us/block (profiled), forward kernels {fwd:.0f}, "
              f"other kernels {other:.0f}, GPU idle {row['gpu_idle_us_per_block']:.0f}", flush=True)
        for r in row["other_kernels"][:12]:
            print(f"   {r['us_per_block']:7.1f} us  x{r['calls_per_block']:<5} {r['kernel'][:90]}")
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
