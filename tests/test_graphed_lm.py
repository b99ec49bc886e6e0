"""The fast mode (static cache, padded buckets; CUDA graphs on a GPU) computes what the eager path does.

On the CPU the same static path runs without graphs: padding, the full-capacity mask, index_copy
writes and in-place compaction are all exercised; only graph capture itself needs a GPU.
"""

import pytest
import torch

from rsd_bench.engine import generate
from rsd_bench.graphed_lm import GraphedRunner
from rsd_bench.lm import ModelRunner
from rsd_bench.tiny_models import tiny_llama

METHODS = [("ar", {}), ("sd", {}), ("spectr", {"K": 3}), ("rsd_c", {"branching": [3, 2, 1]}),
           ("rsd_s", {"W": 3})]


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(seed=0)
    draft = tiny_llama(seed=0)
    with torch.no_grad():  # a close draft, so blocks accept several tokens
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    return target, draft


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_fast_runner_matches_eager(models, method, params):
    target, draft = models
    for seed in range(3):
        logits = {}

        def tracer(name):
            def trace(model, seq, tree, nodes, out):
                logits.setdefault(name, []).append(out.clone())
            return trace

        kw = dict(vocab_size=259, temperature=1.0, max_new_tokens=40, seed=seed, **params)
        eager = generate(ModelRunner(target), ModelRunner(draft), [1, 40, 50, 60], method, 3,
                         trace=tracer("eager"), **kw)
        fast = generate(GraphedRunner(target, capacity=512), GraphedRunner(draft, capacity=512),
                        [1, 40, 50, 60], method, 3, trace=tracer("fast"), **kw)
        assert fast.tokens == eager.tokens
        assert fast.tokens_per_block == eager.tokens_per_block
        assert len(logits["fast"]) == len(logits["eager"])
        for a, b in zip(logits["fast"], logits["eager"]):
            assert (a - b).abs().max() <= 1e-5
        if method != "ar":
            assert eager.block_efficiency > 1.2  # acceptances and compactions happened


def test_fast_runner_refuses_examples_beyond_capacity(models):
    target, _ = models
    runner = GraphedRunner(target, capacity=256)
    with pytest.raises(ValueError, match="capacity"):
        generate(runner, None, list(range(1, 100)), "ar", 0, vocab_size=259, max_new_tokens=64)


@pytest.mark.parametrize("method,params", [("sd", {}), ("rsd_s", {"W": 3})], ids=["sd", "rsd_s"])
def test_eager_attention_variant_matches(models, method, params):
    """The fast runner may pick the matmul-softmax attention per bucket on a GPU; it must compute
    the same tokens and logits as the SDPA path (here both without graphs, on CPU)."""
    import copy

    target, draft = models
    t2, d2 = copy.deepcopy(target), copy.deepcopy(draft)
    kw = dict(vocab_size=259, temperature=1.0, max_new_tokens=30, seed=4, **params)
    got = {}
    for name, (t, d, att) in {"sdpa": (target, draft, "sdpa"), "eager": (t2, d2, "eager")}.items():
        logits = []
        res = generate(GraphedRunner(t, capacity=512, attention=att), GraphedRunner(d, capacity=512, attention=att),
                       [1, 40, 50, 60], method, 3, trace=lambda m, s, tr, n, out: logits.append(out.clone()), **kw)
        got[name] = (res, logits)
    assert t2.config._attn_implementation == "eager" and target.config._attn_implementation == "sdpa"
    assert got["sdpa"][0].tokens == got["eager"][0].tokens
    for a, b in zip(got["sdpa"][1], got["eager"][1]):
        assert (a - b).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="attention"):
        GraphedRunner(target, capacity=64, attention="flash")


def test_compiled_forward_matches(models):
    """torch.compile of the bucketed forwards (the GPU option for fusing small kernels) computes the
    same tokens and logits as the uncompiled static path; here Inductor's CPU backend, no graphs."""
    import copy
    import shutil

    import torch._dynamo

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("Inductor's CPU backend needs a C++ compiler")
    torch._dynamo.reset()

    target, draft = models
    t2, d2 = copy.deepcopy(target), copy.deepcopy(draft)
    kw = dict(vocab_size=259, temperature=1.0, max_new_tokens=20, seed=5, W=3)
    got = {}
    for name, (t, d, comp) in {"plain": (target, draft, False), "compiled": (t2, d2, True)}.items():
        logits = []
        tr, dr = GraphedRunner(t, capacity=512, compile=comp), GraphedRunner(d, capacity=512, compile=comp)
        res = generate(tr, dr, [1, 40, 50, 60], "rsd_s", 2,
                       trace=lambda m, s, tree, n, out: logits.append(out.clone()), **kw)
        got[name] = (res, logits, tr)
    assert got["compiled"][2].compile_mode == "default" and got["plain"][2].compile_mode is None
    assert got["plain"][0].tokens == got["compiled"][0].tokens
    # every bucketed forward ran compiled: no fallback to the uncompiled function
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    for a, b in zip(got["plain"][1], got["compiled"][1]):
        assert (a - b).abs().max() <= 1e-4
