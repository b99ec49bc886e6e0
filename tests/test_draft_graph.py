"""draft.grow's one-graph path (draft_graph.DraftLevelsGraph) drafts what the level-by-level path does.

On the CPU the graph's body runs plainly (device_graph.FORCE_POOLED: pools and padded shapes as
on a GPU). Both paths draw the same uniform numbers in the same order, so from one seed they must
give the same tokens, block by block; any difference in the rows, their cache slots or the
distributions handed to the verifier would change what is accepted.
"""

import pytest
import torch

from rsd_bench import device_graph, draft_graph
from rsd_bench.engine import generate
from rsd_bench.graphed_lm import GraphedRunner
from rsd_bench.tiny_models import tiny_llama

SETTINGS = [("sd", 4, {}, None), ("sd", 1, {}, None), ("spectr", 3, {"K": 3}, None),
            ("rsd_c", 3, {"branching": [3, 2, 1]}, None), ("rsd_s", 3, {"W": 3}, None),
            ("rsd_c", 3, {"branching": [4, 3, 2]}, 0.3), ("rsd_s", 3, {"W": 4}, 0.3),
            ("rsd_c", 3, {"branching": [12, 12, 1]}, None)]


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(seed=0)
    draft = tiny_llama(seed=0)
    with torch.no_grad():  # a close draft, so blocks accept several tokens
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    return target, draft


class LevelByLevel(GraphedRunner):
    fuse_draft_levels = False


@pytest.mark.parametrize("method,L,params,top_p", SETTINGS,
                         ids=[f"{m}-L{L}-{'-'.join(f'{v}' for v in p.values())}-p{t}" for m, L, p, t in SETTINGS])
def test_one_graph_drafts_what_levels_do(monkeypatch, models, method, L, params, top_p):
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    built = []
    real_build = draft_graph.DraftLevelsGraph.build
    monkeypatch.setattr(draft_graph.DraftLevelsGraph, "build",
                        lambda self, *a, **k: (built.append(self), real_build(self, *a, **k))[1])
    target, draft = models
    kw = dict(vocab_size=259, temperature=0.5 if top_p else 1.0, top_p=top_p, max_new_tokens=30, **params)
    for seed in range(2):
        got = {}
        for name, cls in {"levels": LevelByLevel, "graph": GraphedRunner}.items():
            t, d = cls(target, capacity=512, use_graphs=False), cls(draft, capacity=512, use_graphs=False)
            got[name] = generate(t, d, [1, 40, 50, 60], method, L, seed=seed, timing=False, **kw)
            if name == "graph":
                graphs = list(d.draft_graphs.values())
        a, b = got["levels"], got["graph"]
        assert b.tokens == a.tokens
        assert b.tokens_per_block == a.tokens_per_block and b.nodes_per_call == a.nodes_per_call
        assert b.draft_calls == a.draft_calls
        wide = params.get("branching", [0])[0] * params.get("branching", [0, 0])[1] > 128
        if wide:  # 144 rows: no bucket holds the level, so it runs level by level
            assert graphs == [False]
        else:
            assert len(graphs) == 1 and graphs[0] is not False
    assert built
    if not wide and L > 1 and method != "sd":
        assert got["graph"].block_efficiency > 1.2  # acceptances and compactions happened


def test_grow_keeps_the_cache_as_levels_do(monkeypatch, models):
    """After a fused block, the draft cache holds what forward_children left: the next block's
    root call attends over the kept path (compared through the logits of the next draft([0]))."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    target, draft = models
    logits = {}
    for name, cls in {"levels": LevelByLevel, "graph": GraphedRunner}.items():
        d = cls(draft, capacity=512, use_graphs=False)
        seen = []
        real = d.forward

        def forward(tokens, positions, attend=None, _real=real, _seen=seen):
            out = _real(tokens, positions, attend)
            _seen.append(out.clone())
            return out

        d.forward = forward
        generate(cls(target, capacity=512, use_graphs=False), d, [1, 40, 50, 60], "rsd_s", 3,
                 vocab_size=259, max_new_tokens=20, seed=5, timing=False, W=3)
        logits[name] = seen
    assert len(logits["graph"]) == len(logits["levels"]) > 3
    for a, b in zip(logits["graph"], logits["levels"]):
        assert (a - b).abs().max() <= 1e-5


def test_pools_refilled_before_the_read_draw_what_levels_do(monkeypatch, models):
    """The engine refills the next block's level pools before it reads the verification
    (DraftLevelsGraph.prefill): every replay after the first uses numbers drawn that way, and the
    tokens stay the level-by-level path's."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    target, draft = models
    replays = []
    real_replay = draft_graph.DraftLevelsGraph.replay

    def replay(self, runner, probs, state, gen, *a):
        replays.append(self._filled_by is gen)
        return real_replay(self, runner, probs, state, gen, *a)

    monkeypatch.setattr(draft_graph.DraftLevelsGraph, "replay", replay)
    got = {}
    for name, cls in {"levels": LevelByLevel, "graph": GraphedRunner}.items():
        t, d = cls(target, capacity=512, use_graphs=False), cls(draft, capacity=512, use_graphs=False)
        got[name] = generate(t, d, [1, 40, 50, 60], "rsd_c", 3, vocab_size=259, max_new_tokens=30, seed=3,
                             timing=False, branching=[2, 2, 1])
    assert got["graph"].tokens == got["levels"].tokens
    assert got["graph"].tokens_per_block == got["levels"].tokens_per_block
    assert len(replays) == got["graph"].target_calls > 3
    assert not replays[0] and all(replays[1:]), replays  # the first block refills at its replay


def _custom_methods():
    from rsd_bench.methods import get_method
    from rsd_bench.methods.registry import Method
    from rsd_bench.methods.rsd_c import branch_level
    from rsd_bench.sampling import uniform

    alive = torch.ones(1, dtype=torch.long)  # a state buffer the method rewrites in place, unseen by _version

    def draw_first(tree, draft, settings, gen):
        probs = draft([0])
        uniform(gen, (1,), probs.device)  # a draw of its own before grow
        draft.grow(branch_level, probs, (device_graph.constant(1, 1, torch.long, probs.device),), gen,
                   [{"b": b} for b in settings["branching"]])

    def gated(tree, draft, settings, gen):
        probs = draft([0])
        alive.numpy()[:] = len(draft.seq) % 2  # no children on some blocks
        draft.grow(branch_level, probs, (alive,), gen, [{"b": b} for b in settings["branching"]])

    rsd_c = get_method("rsd_c")
    return [Method(name=name, label=name, draft_tree=fn, verify_children=rsd_c.verify_children, params=rsd_c.params,
                   resolve=rsd_c.resolve, max_nodes=rsd_c.max_nodes) for name, fn in (("draw_first", draw_first),
                                                                                     ("gated", gated))]


@pytest.mark.parametrize("which", [0, 1], ids=["draws_before_grow", "rewrites_its_state"])
def test_custom_methods_draft_in_one_graph_what_levels_do(monkeypatch, models, which):
    """A method that draws from the generator itself is not refilled ahead (Method.fixed_levels
    is off by default), and a state tensor other than a device_graph.constant is copied into the
    graph at every block, even when it is the same tensor rewritten without a version bump."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    method = _custom_methods()[which]
    target, draft = models
    got = {}
    for name, cls in {"levels": LevelByLevel, "graph": GraphedRunner}.items():
        got[name] = generate(cls(target, capacity=512, use_graphs=False), cls(draft, capacity=512, use_graphs=False),
                             [1, 40, 50, 60], method, 3, vocab_size=259, max_new_tokens=30, seed=1, timing=False,
                             branching=[2, 2, 1])
    assert got["graph"].tokens == got["levels"].tokens
    assert got["graph"].nodes_per_call == got["levels"].nodes_per_call
    if which:
        assert 1 in got["graph"].nodes_per_call and max(got["graph"].nodes_per_call) > 1


def test_constant_states_work_under_inference_mode(monkeypatch, models):
    """A constant first made under torch.inference_mode is a normal tensor: the graph path stays."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    monkeypatch.setattr(device_graph, "_CONSTANTS", {})
    target, draft = models
    with torch.inference_mode():
        d = GraphedRunner(draft, capacity=512, use_graphs=False)
        generate(GraphedRunner(target, capacity=512, use_graphs=False), d, [1, 40, 50, 60], "rsd_s", 3,
                 vocab_size=259, max_new_tokens=12, seed=0, timing=False, W=2)
    assert [g is not False for g in d.draft_graphs.values()] == [True]
    assert not any(t.is_inference() for t in device_graph._CONSTANTS.values())


def test_no_refill_before_the_read_for_a_block_that_may_lack_room():
    """The next block's levels start at most depth + 1 entries past this block's root; where the
    graph's reach from there could pass the capacity, the next block might run level by level,
    so nothing is drawn for it ahead."""
    from rsd_bench.engine import _DraftSession

    class Graph:
        reach = 10
        widths = [2, 2, 2, 1]  # four levels: a path of at most 4 tokens, then one more

        def prefill(self, gen):
            raise AssertionError("not called here")

    session = _DraftSession.__new__(_DraftSession)
    session.runner = type("R", (), {"capacity": 100})()
    session.base, session.pending, session.fused = 80, 1, Graph()
    assert session.prefill_next(None) is not None  # 81 + 4 + 1 + 10 = 96
    session.base = 86
    assert session.prefill_next(None) is None  # 102
    session.fused = None
    session.base = 0
    assert session.prefill_next(None) is None  # no graph this block


def test_copy_guard_waits_only_within_one_read():
    """CopyGuard.wait synchronizes on the copy's event unless the host has caught up with the
    device since it was recorded."""
    class Event:
        def __init__(self):
            self.waits = 0

        def record(self, stream=None):
            pass

        def synchronize(self):
            self.waits += 1

    dev = torch.device("cuda", 7)  # no such device is touched: the event is a stand-in
    guard = device_graph.CopyGuard(torch.device("cpu"))
    guard.device, guard.event = dev, Event()
    guard.wait()  # nothing recorded
    guard.record()
    guard.wait()  # the copy may still run
    assert guard.event.waits == 1
    guard.record()
    device_graph.caught_up(dev)
    guard.wait()  # a read since: done
    assert guard.event.waits == 1
    guard.record()
    device_graph.caught_up(torch.device("cuda", 6))  # another device's read says nothing
    guard.wait()
    assert guard.event.waits == 2


class Proxy:
    """A runner seen through a proxy, as the benchmark's ForwardEvents sees it: new for each run."""

    def __init__(self, runner):
        self._runner, self.replays = runner, 0

    def graph_replay(self, spans):
        self.replays += 1

    def __getattr__(self, name):
        return getattr(self._runner, name)


def test_a_cached_graph_reports_to_the_proxy_at_hand(monkeypatch, models):
    """A graph built through one proxy and replayed through the next reports to the next: the
    benchmark's timeline of a later run must count the draft forwards inside the graph."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    target, draft = models
    t, d = GraphedRunner(target, capacity=512, use_graphs=False), GraphedRunner(draft, capacity=512, use_graphs=False)
    proxies = [Proxy(d), Proxy(d)]
    results = [generate(t, p, [1, 40, 50, 60], "rsd_s", 3, vocab_size=259, max_new_tokens=20, seed=1,
                        timing=False, W=3) for p in proxies]
    assert len(d.draft_graphs) == 1  # built once, by the first run
    for proxy, result in zip(proxies, results):
        assert proxy.replays == len(result.tokens_per_block)  # one replay per block
    assert results[1].tokens == results[0].tokens


def test_a_graph_that_fails_to_build_leaves_the_levels(monkeypatch, models, caplog):
    """A level function that cannot be captured (e.g. it reads a value on the host) costs speed,
    not the run. Here it fails at level 1 of the build, after level 0's draft forward has written
    the cache and the runner's row pattern: the levels then run one by one, with a warning, and
    must give the level-by-level tokens (so the build left the row pattern as it found it)."""
    from rsd_bench.device_graph import UniformPool
    from rsd_bench.methods import chains

    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    target, draft = models
    real = chains.chain_level
    calls = []

    def flaky_level(probs, rep, gen):
        if isinstance(gen, UniformPool):  # inside the draft levels graph's body
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("operation not permitted when stream is capturing")
            return real.fn(probs, rep, gen=gen)
        return real(probs, rep, gen=gen)  # level by level

    kw = dict(vocab_size=259, max_new_tokens=20, seed=2, timing=False, K=3)
    runs = {}
    for name, cls in {"levels": LevelByLevel, "graph": GraphedRunner}.items():
        if name == "graph":
            monkeypatch.setattr(chains, "chain_level", flaky_level)
        d = cls(draft, capacity=512, use_graphs=False)
        runs[name] = generate(cls(target, capacity=512, use_graphs=False), d, [1, 40, 50, 60], "spectr", 3, **kw)
    assert len(calls) == 2  # it failed once, mid-build, and was not tried again
    assert list(d.draft_graphs.values()) == [False]
    assert "run level by level" in caplog.text
    assert runs["graph"].tokens == runs["levels"].tokens
    assert runs["graph"].block_efficiency > 1.2  # blocks accepted drafts after the failed build


def test_a_graph_refuses_another_runner(monkeypatch, models):
    """The graph reads and writes the buffers of the runner it was built on."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    target, draft = models
    d = GraphedRunner(draft, capacity=512, use_graphs=False)
    generate(GraphedRunner(target, capacity=512, use_graphs=False), d, [1, 40, 50, 60], "sd", 3,
             vocab_size=259, max_new_tokens=8, seed=0, timing=False)
    (graph,) = d.draft_graphs.values()
    other = GraphedRunner(draft, capacity=512, use_graphs=False)
    with pytest.raises(ValueError, match="other than the one it was built on"):
        graph.replay(other, graph.probs_in, graph.state_in, torch.Generator(), 0, 0, 0)
