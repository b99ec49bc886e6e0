"""On a GPU, the fast runner (CUDA graphs, device-built draft levels) against the eager runner.

Each setting runs three ways: eager; fast with a trace (draft levels one by one, logits
compared); fast without one (a block's draft levels as one CUDA graph, draft_graph; tokens
compared).

tests/test_graphed_lm.py checks the same on the CPU, where the fast runner runs its bucket steps
without graphs; only a GPU captures them (the bucket graphs, forward_children's graphs, the
verification and draft-level graphs). Same tiny fp32 models and prompts as those tests, every
method, with and without dead draft rows (top-p). Prints one line per setting and writes
$OUT/gpu_fast_matches_eager.json (or ./). Exit status 1 if tokens differ or logits differ by more
than 1e-3. Usage: python scripts/gpu_fast_matches_eager.py
"""

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rsd_bench.engine import generate  # noqa: E402
from rsd_bench.graphed_lm import GraphedRunner  # noqa: E402
from rsd_bench.lm import ModelRunner  # noqa: E402
from rsd_bench.tiny_models import tiny_llama  # noqa: E402

SETTINGS = [  # (method, L, params, temperature, top_p)
    ("ar", 0, {}, 1.0, None), ("sd", 3, {}, 1.0, None), ("spectr", 3, {"K": 3}, 1.0, None),
    ("rsd_c", 3, {"branching": [3, 2, 1]}, 1.0, None), ("rsd_s", 3, {"W": 3}, 1.0, None),
    ("rsd_c", 3, {"branching": [4, 3, 2]}, 0.5, 0.3), ("rsd_s", 3, {"W": 4}, 0.5, 0.3),
    ("spectr", 4, {"K": 4}, 0.5, 0.3),
    ("rsd_c", 3, {"branching": [12, 12, 1]}, 0.5, 0.3),  # a level of 144 rows: wider than any bucket
]


def main() -> int:
    dev = torch.device("cuda")
    target = tiny_llama(seed=0).to(dev)
    draft = tiny_llama(seed=0).to(dev)
    with torch.no_grad():  # a close draft, so blocks accept several tokens
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    fast_t, fast_d = GraphedRunner(target, capacity=512), GraphedRunner(draft, capacity=512)
    rows, failed = [], False
    for method, L, params, temp, top_p in SETTINGS:
        for seed in range(3):
            got = {}
            for name, (t, d) in {"eager": (ModelRunner(target), ModelRunner(draft)),
                                 "fast": (fast_t, fast_d)}.items():
                logits = []
                t0 = time.time()
                res = generate(t, d, [1, 40, 50, 60], method, L, vocab_size=259, temperature=temp, top_p=top_p,
                               max_new_tokens=40, seed=seed, timing=False,
                               trace=lambda m, s, tr, n, out: logits.append(out.clone()), **params)
                got[name] = (res, logits, time.time() - t0)
            # without a trace the fast runner drafts a block's levels as one graph (draft_graph)
            graphed = generate(fast_t, fast_d, [1, 40, 50, 60], method, L, vocab_size=259, temperature=temp,
                               top_p=top_p, max_new_tokens=40, seed=seed, timing=False, **params)
            (e, el, _), (f, fl, _) = got["eager"], got["fast"]
            diff = max(((a - b).abs().max().item() for a, b in zip(fl, el)), default=0.0)
            one_graph = graphed.tokens == e.tokens and graphed.tokens_per_block == e.tokens_per_block
            ok = e.tokens == f.tokens and len(fl) == len(el) and diff <= 1e-3 and one_graph
            failed |= not ok
            row = dict(method=method, L=L, params=params, temperature=temp, top_p=top_p, seed=seed,
                       same_tokens=e.tokens == f.tokens, same_tokens_one_graph_draft=one_graph,
                       draft_graphs=sum(g is not False for g in fast_d.draft_graphs.values()),
                       forwards=len(el), max_logit_diff=diff,
                       block_efficiency=round(e.block_efficiency, 3),
                       nodes_per_call=sorted(set(e.nodes_per_call)), ok=ok)
            print(row, flush=True)
            rows.append(row)
    out = Path(os.environ.get("OUT", ".")) / "gpu_fast_matches_eager.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": rows}, indent=1))
    print("all match" if not failed else "MISMATCH", flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
