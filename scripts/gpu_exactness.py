"""Chi-square exactness of every method on a GPU, where verification and draft levels run as CUDA
graphs with pooled randomness (rsd_bench/device_graph.py, rsd_bench/verify.py).

The CPU tests check the same bodies without graphs (tests/test_exactness.py, FORCE_POOLED);
this runs the engine with the table models of those tests moved to the GPU, so the captured
graphs themselves are what is sampled: with the eager runner (verification and draft-level
graphs), and with the fast runner (bucket graphs, a block's draft levels as one graph). Usage: python scripts/gpu_exactness.py [runs per setting]
Writes $OUT/gpu_exactness.json (or ./gpu_exactness.json).
"""

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import test_exactness as T  # noqa: E402
from rsd_bench import verify  # noqa: E402
from rsd_bench.engine import generate  # noqa: E402
from rsd_bench.graphed_lm import GraphedRunner  # noqa: E402
from rsd_bench.lm import ModelRunner  # noqa: E402
from stats import ALPHA, chi_square_pvalue  # noqa: E402
from table_lm import TableLM, exact_distribution  # noqa: E402


class CudaTable(TableLM):
    """The table model on the GPU (a parameter tells the runner where it lives). The config lets
    the fast runner size a (one-entry, unused) KV cache: the table needs no context."""

    def __init__(self, table):
        super().__init__(table.cuda())
        self.anchor = torch.nn.Parameter(torch.zeros(1, device="cuda"))
        self.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                      hidden_size=1, _attn_implementation="eager")


# the fast runner: bucket graphs, and a block's draft levels as one CUDA graph (draft_graph)
FAST_SETTINGS = [("sd", 3, {}, 0.6, 3), ("spectr", 2, {"K": 2}, 1.0, 3), ("rsd_c", 2, {"branching": [5, 2]}, 1.0, 3),
                 ("rsd_s", 2, {"W": 3}, 1.0, 3)]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2500
    target_table, draft_table = T.pair()
    rows = []
    settings = [("eager", *s) for s in T.POOLED_SETTINGS + [("ar", 0, {}, 1.0, 3), ("spectr", 3, {"K": 3}, 1.0, 3)]]
    settings += [("fast", *s) for s in FAST_SETTINGS]
    for runner, method, L, params, temp, ntok in settings:
        cls = ModelRunner if runner == "eager" else lambda m, **kw: GraphedRunner(m, capacity=256, **kw)
        target = cls(CudaTable(target_table), vocab_size=T.VOCAB)
        draft = cls(CudaTable(draft_table), vocab_size=T.VOCAB)
        t0 = time.time()
        samples = [tuple(generate(target, draft, T.PROMPT, method, L, vocab_size=T.VOCAB, temperature=temp,
                                  max_new_tokens=ntok, seed=seed, timing=False, **params).tokens)
                   for seed in range(runs)]
        p, stat, dof = chi_square_pvalue(samples, exact_distribution(target_table, T.PROMPT, ntok, temp))
        row = dict(runner=runner, method=method, L=L, params=params, T=temp, runs=runs, pvalue=p, chi2=stat, dof=dof,
                   draft_level_graphs=sum(g is not False for g in getattr(draft, "draft_graphs", {}).values()),
                   passed=p >= ALPHA, seconds=round(time.time() - t0, 1),
                   verification_graphs=sum(1 for v in verify._GRAPHS.values() if v and v.graph is not None),
                   fallbacks=sum(1 for v in verify._GRAPHS.values() if v is False))
        print(row, flush=True)
        rows.append(row)
    out = Path(os.environ.get("OUT", ".")) / "gpu_exactness.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "alpha": ALPHA, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
