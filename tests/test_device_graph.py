"""What a GPU captures: pooled bodies compiled by Inductor compute what the plain bodies compute.

On a GPU `device_graph.capture` compiles each body (`fuse`) before capturing it. Here the same
compilation runs on the CPU (Inductor's C++ backend) for the verification body of both
verifier families, and the outputs are compared with the plain body's on the same pooled numbers.
The statistics of the GPU path itself are checked by scripts/gpu_exactness.py.
"""

import shutil

import pytest
import torch

from rsd_bench import device_graph
from rsd_bench.methods import get_method
from rsd_bench.verify import GraphedDecide

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="Inductor's CPU backend needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("method", ["rsd_s", "spectr"])
def test_fused_verification_body_matches_the_plain_body(method):
    m = get_method(method)
    settings = m.settings(3)
    vocab, nodes, rows, k = 40, 8, 4, 2
    g = GraphedDecide(m.verify_children, nodes, rows, k, vocab, settings, 1.0, None, torch.device("cpu"))
    init = torch.Generator().manual_seed(0)
    g.logits.normal_(generator=init)
    g.draft.copy_(torch.softmax(torch.randn(rows, vocab, generator=init), -1))
    # rows 0-3 decide nodes 0-3; node 1 has one proposal (padded with -1)
    g.ints.copy_(torch.tensor([0, 1, 2, 3] + [1, 2, 3, -1, 4, 5, 6, 7]))
    fused = device_graph.fuse(g.body)
    assert fused is not g.body
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # fresh pool numbers each time, as before every replay
        g.pool.refill(gen)
        plain = g.body().clone()
        assert torch.equal(fused(), plain)


def test_fuse_off_captures_the_plain_body(monkeypatch):
    monkeypatch.setattr(device_graph, "FUSE", False)

    def body():
        return torch.zeros(1)

    assert device_graph.fuse(body) is body


def test_stopwatch_does_not_time_graph_building():
    import time

    from rsd_bench.lm import Stopwatch

    watch = Stopwatch(torch.device("cpu"))
    watch.switch("draft")
    with device_graph.SetupClock():  # a capture (and compile) of a new shape mid-generation
        time.sleep(0.2)
    time.sleep(0.01)
    watch.switch(None)
    assert 0.005 < watch.totals["draft"] < 0.1
