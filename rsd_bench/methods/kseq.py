"""SpecTr's K-SEQ verifier (Sun et al. 2023) for k i.i.d. draft tokens at a node (rows = nodes).

rho* in [1, k] solves 1 - (1 - beta(rho))^k = rho * beta(rho), beta(rho) = sum_x min(D, T/rho).
The left side minus the right is strictly decreasing in rho, >= 0 at 1 and <= 0 at k, so a
bracketing search finds it. Accept X_j with probability min(1, T(X_j) / (rho* D(X_j))), first
acceptance wins (the k tests use independent uniforms, so they are drawn and compared at once);
if all k are rejected, sample from the residual T - min(D, T/rho*) (1 - (1 - beta)^k) / beta
(clipped at 0, renormalised). k = 1 gives SD.
"""

from __future__ import annotations

import torch

from ..sampling import normalize, sample_rows, uniform


POINTS, ROUNDS = 16, 5  # bracket after the search: (k - 1) / (POINTS - 1) ** ROUNDS


def _per_row(k, n: int, device) -> torch.Tensor:
    return torch.as_tensor(k, dtype=torch.float64, device=device).expand(n)


def solve_rho(target_p: torch.Tensor, draft_p: torch.Tensor, k, rounds: int = ROUNDS,
              points: int = POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, beta(rho)) as float64 tensors with rho >= rho*, no host synchronisation.

    Rows of 2-D inputs are solved independently (k: an int or one count per row); 1-D inputs give
    0-d results. Each round evaluates the function on a grid of `points` and keeps the bracketing
    cell, so the bracket shrinks by (points - 1) per round: (k - 1) / 15**5 = 1.3e-6 (k - 1) here.
    The upper end of the final bracket is returned: any rho >= rho* keeps the residual
    non-negative, so the verifier stays exact, and a rho that much above rho* lowers each
    acceptance probability by at most that relative amount. (The midpoint could fall just below
    rho*, where the residual would need clipping.) A small grid over more rounds because each
    round materialises [rows, points, V]: memory traffic on the GPU, not launches, sets its cost.
    """
    t, d = target_p.double(), draft_p.double()
    single = t.dim() == 1
    if single:
        t, d = t[None], d[None]
    n, dev = t.shape[0], t.device
    kk = _per_row(k, n, dev)[:, None]
    lo, hi = torch.ones(n, 1, dtype=torch.float64, device=dev), kk
    steps = torch.linspace(0.0, 1.0, points, dtype=torch.float64, device=dev)
    for _ in range(rounds):
        grid = torch.lerp(lo, hi, steps)  # [n, points]; all ones where k = 1 (rho* = 1)
        beta = (t[:, None, :] / grid[:, :, None]).clamp_(max=d[:, None, :]).sum(-1)  # sum_x min(D, T/rho)
        # f(rho) = 1 - (1 - beta)^k - rho beta >= 0  <=>  (1 - beta)^k + rho beta <= 1
        above = ((1.0 - beta).pow_(kk).add_(grid * beta) <= 1.0).sum(-1, keepdim=True)
        cell = (above - 1).clamp_(0, points - 2)
        lo, hi = grid.gather(1, cell), grid.gather(1, cell + 1)
    rho = hi[:, 0]
    beta = (t / rho[:, None]).clamp_(max=d).sum(-1)
    return (rho[0], beta[0]) if single else (rho, beta)


def kseq_residual(target_p: torch.Tensor, draft_p: torch.Tensor, rho: torch.Tensor,
                  beta: torch.Tensor, k) -> torch.Tensor:
    """T - min(D, T/rho) (1 - (1 - beta)^k) / beta, clipped at 0 and renormalised (rows of 2-D inputs)."""
    t = target_p.double()
    kk = torch.as_tensor(k, dtype=torch.float64, device=t.device)
    if t.dim() == 2:
        rho, beta, kk = rho[:, None], beta[:, None], kk.expand(t.shape[0])[:, None]
    # beta = 0 (draft and target disjoint): every draft is rejected and the residual is T;
    # decided on the device (gamma's limit is k, and min(D, T/rho) is all zeros then anyway)
    safe = beta.clamp_min(torch.finfo(torch.float64).tiny)
    gamma = torch.where(beta > 0, (1.0 - (1.0 - beta).pow(kk)) / safe, kk.expand_as(beta))
    residual = (t - torch.minimum(draft_p.double(), t / rho) * gamma).clamp_min(0.0)
    return normalize(residual, t).float()


def kseq_verify(target_p: torch.Tensor, draft_p: torch.Tensor, proposals: torch.Tensor,
                settings: dict, gen: torch.Generator, rho_override: float | None = None):
    """Rows = nodes; proposals [n, kmax], -1 padded: node i's k_i i.i.d. draft tokens."""
    n, kmax = proposals.shape
    valid = proposals >= 0
    k = valid.sum(1).clamp_min(1).double()  # padded rows (no proposals) are ignored by the engine
    t, d = target_p.double(), draft_p.double()
    rho, beta = solve_rho(t, d, k)  # on a GPU, part of verify.GraphedDecide's graph
    if rho_override is not None:  # only for tests that show a broken verifier is caught
        rho = torch.full((n,), float(rho_override), dtype=torch.float64, device=t.device)
        beta = torch.minimum(d, t / rho[:, None]).sum(-1)
    x = proposals.clamp_min(0)
    u = uniform(gen, (n, kmax), t.device).double()
    # the k tests use independent uniforms, so all are drawn and compared at once
    accepted = valid & (u * rho[:, None] * d.gather(1, x) < t.gather(1, x))
    first = accepted.to(torch.uint8).argmax(1)  # the first acceptance wins
    choice = torch.where(accepted.any(1), first, torch.full_like(first, -1))
    return choice, sample_rows(kseq_residual(t, d, rho, beta, k), gen)
