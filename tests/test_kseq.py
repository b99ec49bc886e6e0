"""K-SEQ's rho search: the returned rho is never below rho* (so the residual needs no clipping and the
verifier is exact) and overshoots it by at most the final bracket, (k - 1) / (POINTS - 1)**ROUNDS; rows solve independently."""

import pytest
import torch

from rsd_bench.methods.kseq import POINTS, ROUNDS, kseq_residual, solve_rho


def _f(t, d, k, rho):
    beta = torch.minimum(d, t / rho).sum()
    return float(1 - (1 - beta) ** k - rho * beta)


def _rho_star(t, d, k):
    lo, hi = 1.0, float(k)
    for _ in range(200):  # plain bisection to machine precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _f(t, d, k, mid) >= 0 else (lo, mid)
    return hi


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_rho_is_an_upper_bracket_of_rho_star(k):
    g = torch.Generator().manual_seed(k)
    for trial in range(40):
        V = int(torch.randint(2, 200, (1,), generator=g))
        t = torch.softmax(torch.randn(V, generator=g) * 3, 0).double()
        d = torch.softmax(torch.randn(V, generator=g) * 3, 0).double()
        if trial % 5 == 0:  # draft without support on half the vocabulary
            d[: V // 2] = 0
            d /= d.sum()
        rho, beta = solve_rho(t, d, k)
        star = _rho_star(t, d, k)
        assert float(beta) == pytest.approx(float(torch.minimum(d, t / rho).sum()), abs=1e-12)
        if k == 1:
            assert float(rho) == 1.0
            continue
        assert float(rho) >= star - 1e-12
        assert float(rho) - star <= (k - 1) / (POINTS - 1) ** ROUNDS + 1e-12
        assert _f(t, d, k, float(rho)) <= 1e-12
        residual = kseq_residual(t.float(), d.float(), rho, beta, k)
        assert float(residual.sum()) == pytest.approx(1.0, abs=1e-5) and float(residual.min()) >= 0


def test_disjoint_supports_give_the_target_as_residual():
    t = torch.tensor([0.5, 0.5, 0.0, 0.0])
    d = torch.tensor([0.0, 0.0, 0.3, 0.7])
    rho, beta = solve_rho(t, d, 3)
    assert float(beta) == 0.0
    assert torch.allclose(kseq_residual(t, d, rho, beta, 3), t)


def test_rows_solve_as_single_rows_with_their_own_k():
    g = torch.Generator().manual_seed(7)
    t = torch.softmax(torch.randn(4, 50, generator=g) * 3, -1).double()
    d = torch.softmax(torch.randn(4, 50, generator=g) * 3, -1).double()
    k = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    rho, beta = solve_rho(t, d, k)
    residual = kseq_residual(t, d, rho, beta, k)
    for i in range(4):
        r1, b1 = solve_rho(t[i], d[i], int(k[i]))
        assert float(rho[i]) == pytest.approx(float(r1), abs=1e-12)
        assert float(beta[i]) == pytest.approx(float(b1), abs=1e-12)
        assert torch.allclose(residual[i], kseq_residual(t[i], d[i], r1, b1, int(k[i])), atol=1e-7)
