"""The fast mode (static cache, padded buckets; CUDA graphs on a GPU) computes what the eager path does.

On the CPU the same static path runs without graphs: padding, the full-capacity mask, index_copy
writes and in-place compaction are all exercised; only graph capture itself needs a GPU.
"""

import dataclasses

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


@pytest.mark.parametrize("method,params", [("rsd_c", {"branching": [4, 3, 2]}), ("rsd_s", {"W": 4}),
                                           ("rsd_c", {"branching": [12, 12, 1]})],
                         ids=["rsd_c", "rsd_s", "rsd_c-144-rows"])
def test_fast_runner_matches_eager_with_dead_rows(models, method, params):
    """top_p = 0.3 at temperature 0.5 leaves few tokens alive, so draft levels carry dead rows: the
    fast runner's device-built level inputs (forward_children) must match the eager runner's dense
    masks. 12-12-1 drafts a level of 144 rows, wider than the largest bucket (no graph there)."""
    target, draft = models
    kw = dict(vocab_size=259, temperature=0.5, top_p=0.3, max_new_tokens=30, seed=2, **params)
    got = {}
    for name, cls in {"eager": ModelRunner, "fast": lambda m: GraphedRunner(m, capacity=512)}.items():
        logits = []
        res = generate(cls(target), cls(draft), [1, 40, 50, 60], method, 3,
                       trace=lambda m, s, tr, n, out: logits.append(out.clone()), **kw)
        got[name] = (res, logits)
    assert got["fast"][0].tokens == got["eager"][0].tokens
    assert max(got["eager"][0].nodes_per_call) > min(got["eager"][0].nodes_per_call)  # trees of dead rows
    for a, b in zip(got["fast"][1], got["eager"][1]):
        assert (a - b).abs().max() <= 1e-5


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


@pytest.fixture
def restore_rotary():
    """fuse_small_ops swaps transformers' apply_rotary_pos_emb for a dispatcher (inert outside
    fused_ops.enabled()); put the original back after the test anyway."""
    from rsd_bench import fused_ops

    yield
    fused_ops.restore_rotary()


def test_parts_compile_matches(models, restore_rotary):
    """compile="parts" (compiled RMSNorm, rotary and SiLU * up; cache writes and attention eager)
    computes the same tokens and logits as the uncompiled static path; Inductor's CPU backend."""
    import copy
    import shutil

    import torch._dynamo

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("Inductor's CPU backend needs a C++ compiler")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    target, draft = models
    t2, d2 = copy.deepcopy(target), copy.deepcopy(draft)
    kw = dict(vocab_size=259, temperature=1.0, max_new_tokens=20, seed=5, W=3)
    got = {}
    for name, (t, d, comp) in {"plain": (target, draft, False), "parts": (t2, d2, "parts")}.items():
        logits = []
        tr, dr = GraphedRunner(t, capacity=512, compile=comp), GraphedRunner(d, capacity=512, compile=comp)
        res = generate(tr, dr, [1, 40, 50, 60], "rsd_s", 2,
                       trace=lambda m, s, tree, n, out: logits.append(out.clone()), **kw)
        got[name] = (res, logits, tr)
    runner = got["parts"][2]
    assert runner.compile_mode == "parts" and got["plain"][2].compile_mode is None
    # 2 layers: q/k/v and gate/up concatenated per layer; o, gate, up, down per layer + lm_head
    assert runner.fused == {"rms_norm": 5, "silu_mul": 2, "rotary": 2, "add_rms_norm": 2, "qkv": 2,
                            "gate_up": 2, "linear": 9}
    assert got["plain"][2].fused == {}
    assert got["plain"][0].tokens == got["parts"][0].tokens
    # the three compiled functions (RMSNorm, SiLU * up, rotary) ran: no silent fallback to eager
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 3
    assert len(got["plain"][1]) == len(got["parts"][1])
    for a, b in zip(got["plain"][1], got["parts"][1]):
        assert (a - b).abs().max() <= 1e-5


def test_fuse_small_ops_counts_idempotent_and_inert_outside_scope(restore_rotary):
    from transformers.models.llama import modeling_llama

    from rsd_bench import fused_ops

    original_rotary = modeling_llama.apply_rotary_pos_emb
    model = tiny_llama(layers=3, seed=1)
    ids = torch.randint(3, 259, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    counts = fused_ops.fuse_small_ops(model)
    assert counts == {"rms_norm": 2 * 3 + 1, "silu_mul": 3, "rotary": 3, "add_rms_norm": 3, "qkv": 3, "gate_up": 3,
                      "linear": 4 * 3 + 1}
    patched = {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}
    # instances, not classes: q, k and v of each fused attention are patched too
    assert len(patched) == (counts["rms_norm"] + counts["silu_mul"] + counts["add_rms_norm"] + counts["linear"]
                            + 3 * counts["qkv"])
    attn = model.model.layers[0].self_attn
    qkv = attn.q_proj._rsd_qkv  # one weight; the modules' weights are views of its row blocks
    assert attn.k_proj.weight.data_ptr() == qkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert type(model.model.norm).forward is modeling_llama.LlamaRMSNorm.forward  # class untouched
    dispatcher = modeling_llama.apply_rotary_pos_emb
    assert dispatcher is not original_rotary and dispatcher._rsd_fused_original is original_rotary

    assert fused_ops.fuse_small_ops(model) == counts  # idempotent: nothing re-patched or re-wrapped
    assert {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__} == patched
    assert modeling_llama.apply_rotary_pos_emb is dispatcher

    with torch.no_grad():  # outside fused_ops.enabled() the original forwards run: bit-identical
        assert torch.equal(model(ids).logits, before)
    fused_ops.unfuse_small_ops(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    fused_ops.restore_rotary()
    assert modeling_llama.apply_rotary_pos_emb is original_rotary


def test_compile_mode_spellings():
    """Config spellings of GraphedRunner's compile map to one mode; a typo stops with the choices."""
    from rsd_bench.graphed_lm import _compile_mode

    for off in (False, None, "", "none", "False", "off"):
        assert _compile_mode(off) is None
    assert _compile_mode(True) == "default" and _compile_mode("true") == "default"
    assert _compile_mode("Parts") == "parts" and _compile_mode("max-autotune") == "max-autotune"
    with pytest.raises(ValueError, match="compile must be none, parts"):
        _compile_mode("part")


def test_load_pair_passes_compile_to_the_fast_runners():
    from rsd_bench.pair import load_pair

    pair = load_pair("random-llama:layers=1,hidden=32,seed=0", "random-llama:layers=1,hidden=32,seed=1",
                     device="cpu", fast=True, compile="none")
    assert pair.target.compile_mode is None and pair.draft.compile_mode is None
    with pytest.raises(ValueError, match="compile must be"):
        load_pair("random-llama:layers=1,hidden=32,seed=0", device="cpu", fast=True, compile="fast")


def test_parts_modes_run_the_fused_forward(restore_rotary):
    """Both "parts" modes go through the fused-ops scope, never a whole-forward torch.compile
    (which rejects their names); only "parts" adds the Triton kernels (matmuls, KV write)."""
    from rsd_bench.tiny_models import tiny_llama

    for mode, matmuls in (("parts", True), ("parts-cublas", False)):
        runner = GraphedRunner(tiny_llama(layers=1, seed=7), capacity=64, compile=mode)
        assert runner._compiled == runner._call_fused
        assert ("linear" in runner.fused) is matmuls and runner.cache.one_kernel_writes is matmuls


def test_tree_mask_packs_the_same_bits_as_its_dense_pattern(models):
    from rsd_bench.lm import TreeMask

    runner = GraphedRunner(models[0], vocab_size=259, capacity=256, use_graphs=False)
    runner.length = 40
    gen = torch.Generator().manual_seed(0)
    for n, prefix, bucket in [(3, 37, 4), (5, 40, 8), (1, 30, 1), (6, 33, 8)]:
        past = runner.length
        cached = [torch.randint(prefix, past, (3,), generator=gen).tolist() if prefix < past else []
                  for _ in range(n)]
        rows = [sorted(set(c) | {past + i}) for i, c in enumerate(cached)]
        mask = TreeMask(prefix, rows)
        used = runner._pack(list(range(n)), [past] * n, bucket, mask)
        ints, bits = (t.clone() for t in runner.packed_call(bucket))
        bits = bits[:used]
        dense = mask.dense(n, past + n)
        assert dense[:, :prefix].all() and dense.sum() == n * prefix + sum(map(len, rows))
        assert runner._pack(list(range(n)), [past] * n, bucket, dense) == used
        assert torch.equal(runner.packed_call(bucket)[0], ints)
        assert torch.equal(runner.packed_call(bucket)[1][:used], bits)


def test_tree_mask_with_a_column_outside_the_block_is_refused(models):
    from rsd_bench.lm import TreeMask

    runner = GraphedRunner(models[0], vocab_size=259, capacity=256, use_graphs=False)
    runner.length = 40
    with pytest.raises(ValueError, match="outside"):  # below the prefix: would set another row's bit
        runner._pack([1, 2], [40, 40], 2, TreeMask(38, [[37, 40], [41]]))


def _random_rows(widths: list[int], gen: torch.Generator, vocab: int = 259):
    """Levels of rows [parent; token] (parent: a row of the level above; level 0's: the root),
    with the parent offsets and the call's ancestor lists (call rows, root = 0)."""
    parents, tokens, offsets, ancestors = [], [], [], [[0]]
    above, first, prev = 0, 0, 1
    for width in widths:
        p = torch.randint(0, prev, (width,), generator=gen).tolist()
        parents += p
        tokens += torch.randint(3, vocab, (width,), generator=gen).tolist()
        offsets += [above] * width
        ancestors += [ancestors[above + q] + [1 + first + i] for i, q in enumerate(p)]
        above, first, prev = 1 + first, first + width, width
    return torch.tensor([parents, tokens]), offsets, ancestors


def test_row_ancestors_follows_parents_in_any_order():
    from rsd_bench.lm import row_ancestors

    gen = torch.Generator().manual_seed(0)
    for n in [1, 2, 3, 5, 9, 17, 40]:
        order = torch.randperm(n, generator=gen).tolist()  # rows need not come in tree order
        parent = [order[0]] * n  # a root at order[0]; each later row hangs below an earlier one
        for k in range(1, n):
            parent[order[k]] = order[int(torch.randint(0, k, (1,), generator=gen))]
        expected = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            node = i
            expected[i, node] = True
            while node != order[0]:
                node = parent[node]
                expected[i, node] = True
        assert torch.equal(row_ancestors(torch.tensor(parent)), expected)
    chain = torch.tensor([0] + list(range(15)))  # depth 15 in 16 rows: the most jumps a bucket needs
    assert torch.equal(row_ancestors(chain), torch.ones(16, 16, dtype=torch.bool).tril())
    for depth in range(1, 16):  # with the depth given, fewer steps, still every ancestor
        bounded = row_ancestors(chain[: depth + 1], depth)
        assert torch.equal(bounded, torch.ones(depth + 1, depth + 1, dtype=torch.bool).tril())
    assert not row_ancestors(chain[:4], 1)[3, 0]  # a bound too low misses ancestors (the check bites)


@pytest.mark.parametrize("widths", [[1, 1, 1], [2, 2, 2, 2], [3, 6, 2], [12, 12]],
                         ids=["chain", "bucket-16", "bucket-16-mixed", "wide-145"])
def test_forward_rows_matches_a_tree_mask_call(models, widths):
    """A target call over a root and rows given on the device gives the logits and cache entries
    (a decode step after keeping one path reads them) of the same tree sent as host lists
    (TreeMask), on both runners; 12-12 (145 rows) is wider than the largest bucket."""
    from rsd_bench.lm import TreeMask

    gen = torch.Generator().manual_seed(len(widths))
    rows, offsets, ancestors = _random_rows(widths, gen)
    n = 1 + rows.shape[1]
    context = list(range(5, 45))
    depth = [len(a) - 1 for a in ancestors]
    past = len(context) - 1
    for make in (lambda m: ModelRunner(m, vocab_size=259),
                 lambda m: GraphedRunner(m, vocab_size=259, capacity=512, use_graphs=False)):
        out = []
        for by_rows in (True, False):
            runner = make(models[0])
            runner.reset(256)
            runner.forward(context[:-1], list(range(past)), None)
            positions = [past + d for d in depth]
            if by_rows:
                logits = runner.forward_rows(context[-1], rows, offsets, positions)
            else:
                mask = TreeMask(past, [[past + a for a in anc] for anc in ancestors])
                logits = runner.forward([context[-1]] + rows[1].tolist(), positions, mask)
            assert logits.shape == (n, 259) and runner.length == past + n
            path = ancestors[-1]  # keep the root and the last row's ancestors, then decode on
            runner.keep(past, path)
            after = runner.forward([7], [past + len(path)], None)
            out.append(torch.cat([logits, after]))
        assert (out[0] - out[1]).abs().max() <= 1e-5


def test_wide_trees_are_verified_over_nodes_on_a_tight_cache(models):
    """RSD-C 12-12-1 drafts 300 rows: more than the largest bucket, most of them dead under top-p.
    The fast runner then takes the call over the tree's nodes (takes_rows), so a cache sized for
    the nodes suffices, and the tokens are the eager runner's (which verifies over rows)."""
    target, draft = models
    kw = dict(vocab_size=259, temperature=0.5, top_p=0.3, max_new_tokens=40, seed=0, timing=False,
              branching=[12, 12, 1])
    capacity = 4 + 40 + 3 + 192  # as pair.py sizes a fast runner: 192 entries of slack
    fast_t = GraphedRunner(target, vocab_size=259, capacity=capacity, use_graphs=False)
    calls = []
    fast_t.forward_rows = lambda *a, **k: calls.append(1) or GraphedRunner.forward_rows(fast_t, *a, **k)
    fast = generate(fast_t, GraphedRunner(draft, vocab_size=259, capacity=capacity, use_graphs=False),
                    [1, 40, 50, 60], "rsd_c", 3, **kw)
    eager = generate(ModelRunner(target), ModelRunner(draft), [1, 40, 50, 60], "rsd_c", 3, **kw)
    assert fast.tokens == eager.tokens and not calls
    assert not fast_t.takes_rows(1 + 300) and fast_t.takes_rows(1 + 8)


def test_dead_rows_of_the_last_level_may_hold_any_value(models):
    """A method may leave anything in a dead row of its last level (no draft call reads it):
    the target call over rows gets them as token 0 of a valid parent, and the tokens match
    the call over nodes."""
    from rsd_bench.methods import rsd_c

    def level(probs, alive, gen, b, last):
        rows, alive = rsd_c.branch_level(probs, alive, gen=gen, b=b)
        if last:  # -1 token and parent where dead
            rows = torch.where(rows[2:] != 0, rows, torch.tensor([[-1], [-1], [0]]))
        return rows, alive

    def draft_tree(tree, draft, settings, gen):
        probs = draft([0])
        b = settings["branching"]
        draft.grow(level, probs, (torch.ones(1, dtype=torch.long),), gen,
                   [{"b": x, "last": i == len(b) - 1} for i, x in enumerate(b)])

    method = dataclasses.replace(rsd_c.RSD_C, name="rsd_c_dead_rows_minus_one", draft_tree=draft_tree)
    target, draft = models
    got = []
    for rows in (True, False):
        t = ModelRunner(target)
        t.target_from_rows = rows
        res = generate(t, ModelRunner(draft), [1, 40, 50, 60], method, 3, vocab_size=259, temperature=0.5,
                       top_p=0.3, max_new_tokens=40, seed=1, timing=False, branching=[3, 2, 2])
        got.append(res.tokens)
    assert got[0] == got[1]


def test_every_call_path_records_the_span_events_once(models):
    """The benchmark's ForwardEvents hands the fast runner two events per call: each path of
    forward, forward_children and forward_rows must record both, once (an unrecorded event
    would fail the timing; one recorded twice would move the span)."""

    class Mark:
        def __init__(self):
            self.records = 0

        def record(self):
            self.records += 1

    runner = GraphedRunner(models[0], vocab_size=259, capacity=512, use_graphs=False)
    runner.reset(256)
    gen = torch.Generator().manual_seed(0)

    def marked(call, *args):
        runner.span_events = marks = (Mark(), Mark())
        try:
            call(*args)
        finally:
            runner.span_events = None
        assert [m.records for m in marks] == [1, 1], call.__name__

    marked(runner.forward, list(range(3, 160)), list(range(157)), None)  # wider than a bucket: prefill path
    marked(runner.forward, [5, 6], [157, 158], None)  # a bucket
    wide = torch.stack([torch.zeros(130, dtype=torch.long), torch.randint(3, 259, (130,), generator=gen)])
    marked(runner.forward_children, wide, [159] * 130, 1)  # wider than a bucket
    runner.keep(157, [0, 1])
    marked(runner.forward, [7], [159], None)
    marked(runner.forward_children, wide[:, :3], [160] * 3, 0)  # a bucket
    for widths in ([2, 2], [12, 12]):  # a bucket, and wider than one (through forward)
        rows, offsets, ancestors = _random_rows(widths, gen)
        positions = [runner.length + len(a) - 1 for a in ancestors]
        marked(runner.forward_rows, 9, rows, offsets, positions)


@pytest.mark.parametrize("method,params", [("rsd_c", {"branching": [2, 2, 1]}), ("spectr", {"K": 2})])
def test_pinned_buffer_waits_happen_only_within_one_read(monkeypatch, models, method, params):
    """A call's wait for its pinned inputs buffer (CopyGuard) synchronizes only on a copy queued
    since the host last read from the device. The engine reads once per block (the verification)
    and queues one bucket or rows call per runner after it, so no call ever waits; in particular
    not on the target's compaction, which is queued behind the next draft (keep has a guard of
    its own). Before that, the target's call waited for the whole draft every block."""
    from rsd_bench import device_graph
    from rsd_bench.engine import generate

    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    waits = []

    class Event:
        def __init__(self, name):
            self.name = name

        def record(self, stream=None):
            pass

        def synchronize(self):
            waits.append(self.name)

    runners = {}
    for name, model in zip(("target", "draft"), models):
        runner = runners[name] = GraphedRunner(model, vocab_size=259, capacity=512, use_graphs=False)
        for attr in ("_copied", "_kept"):
            guard = getattr(runner, attr)
            guard.event = Event(f"{name}.{attr}")
    result = generate(runners["target"], runners["draft"], [1, 40, 50, 60], method, 3, vocab_size=259,
                      max_new_tokens=24, seed=0, timing=False, **params)
    assert result.target_calls > 3 and max(result.tokens_per_block) > 1  # blocks that kept a path
    assert waits == []
    # and a guard does wait within one read
    guard = runners["target"]._copied
    guard.record()
    guard.wait()
    assert waits == ["target._copied"]
