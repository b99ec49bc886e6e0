"""The sampling primitives every method draws through: exact draws, row-wise normalisation, top-k."""

import pytest
import torch

from rsd_bench.sampling import normalize, sample_rows, top_k_by_argmax

from stats import ALPHA, chi_square_pvalue


def test_sample_rows_draws_each_row_from_its_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.5, 0.0]])
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    draws = sample_rows(probs.repeat(n, 1), gen).view(n, 2)
    for row in range(2):
        samples = [(int(x),) for x in draws[:, row]]
        exact = {(i,): float(p) for i, p in enumerate(probs[row])}
        pvalue, stat, dof = chi_square_pvalue(samples, exact)  # a zero-probability draw gives p = 0
        assert pvalue >= ALPHA, f"row {row}: chi2={stat:.1f} dof={dof} p={pvalue:.2e}"


def test_sample_rows_accepts_unnormalised_weights():
    gen = torch.Generator().manual_seed(1)
    draws = sample_rows(torch.tensor([[0.0, 3.0, 0.0]]).repeat(100, 1), gen)
    assert draws.eq(1).all()


def test_normalize_rows_and_fallback():
    w = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    fallback = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    assert torch.equal(normalize(w, fallback), torch.tensor([[0.25, 0.75], [0.2, 0.8]]))
    assert torch.equal(normalize(torch.tensor([2.0, 2.0]), torch.zeros(2)), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_by_argmax_matches_topk(dtype):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 300, generator=g, dtype=dtype)
    scores[1, :298] = -torch.inf  # fewer finite entries than k: -inf values come back, callers drop them
    for k in (1, 2, 4):
        values, indices = top_k_by_argmax(scores, k)
        ref_values, ref_indices = scores.topk(k, dim=-1)
        assert torch.equal(values, ref_values)
        finite = ref_values > -torch.inf
        assert torch.equal(indices[finite], ref_indices[finite])
    flat_values, flat_indices = top_k_by_argmax(scores.view(-1), 3)  # RSD-S's flattened beam
    assert torch.equal(flat_values, scores.view(-1).topk(3).values)


def _pool_with(numbers):
    from rsd_bench.device_graph import UniformPool

    pool = UniformPool("cpu")
    pool.take(len(numbers))
    pool.allocate()
    pool.buffer.copy_(torch.tensor(numbers))
    return pool


def test_a_zero_uniform_does_not_hand_the_race_to_a_negligible_token():
    # On the CPU a pooled uniform of exactly 0 (once per 2^24 numbers) stands for U in
    # [0, 2^-24): an Exp(1) value that small lets a token win only if p / E beats the others,
    # so a token of probability 1e-12 must still lose to one holding almost all the mass.
    probs = torch.tensor([[1.0 - 3e-12, 1e-12, 1e-12, 1e-12]])
    assert int(sample_rows(probs, _pool_with([0.5, 0.0, 0.3, 0.9]))) == 0


def test_a_zero_uniform_stands_for_the_top_of_the_range_on_cuda(monkeypatch):
    # torch's CUDA uniform_ maps curand's 1.0 to 0.0: there a 0 stands for U near 1, an Exp(1)
    # value of ~18 that almost never wins, and a Gumbel value of ~18 that almost always does.
    from rsd_bench import sampling

    probs = torch.tensor([[0.5, 0.5 - 1e-9, 1e-9]])
    numbers = [0.0, 0.5, 0.5]
    assert int(sample_rows(probs, _pool_with(numbers))) == 0  # CPU: 0 is the bottom cell, E ~ 3e-8
    monkeypatch.setattr(sampling, "zero_stands_for_top", lambda device: True)
    assert int(sample_rows(probs, _pool_with(numbers))) == 1  # CUDA: E ~ 18, token 1's p / E wins
    g = sampling.gumbel(_pool_with([0.0, 0.999]), (2,))
    assert g[0] > 17 and torch.isfinite(g).all()
    monkeypatch.setattr(sampling, "zero_stands_for_top", lambda device: False)
    g = sampling.gumbel(_pool_with([0.0, 0.999]), (2,))
    assert -3 < g[0] < -2.8 and torch.isfinite(g).all()


@pytest.mark.parametrize("n", [100, 4 * 512, 5000])  # one stage; chunks; chunks with padding
def test_row_max_matches_max_with_first_index_on_ties(n):
    from rsd_bench.sampling import row_max

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 7, (5, n), generator=g).double()  # many ties
    x[1] = -torch.inf  # a row with nothing finite
    x[2, -3:] = 100.0  # the maximum in the padded last chunk
    values, index = row_max(x)
    ref_values, _ = x.max(-1)
    ref_index = torch.stack([torch.nonzero(row == row.max())[0, 0] for row in x])
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)
    flat_v, flat_i = row_max(x.view(-1))  # 1-D input, as RSD-S's flattened beam level
    assert float(flat_v) == float(x.max()) and int(flat_i) == int(torch.nonzero(x.view(-1) == x.max())[0, 0])
