"""SpecTr's K-SEQ verifier (Sun et al. 2023) for k i.i.d. draft tokens at one node.

rho* in [1, k] solves 1 - (1 - beta(rho))^k = rho * beta(rho), beta(rho) = sum_x min(D, T/rho).
The left side minus the right is strictly decreasing in rho, >= 0 at 1 and <= 0 at k, so a
bracketing search finds it. Accept X_j with probability min(1, T(X_j) / (rho* D(X_j))), first
acceptance wins (the k tests use independent uniforms, so they are drawn and compared at once,
with one host transfer); if all k are rejected, sample from the residual
T - min(D, T/rho*) (1 - (1 - beta)^k) / beta (clipped at 0, renormalised). k = 1 gives SD.
"""

from __future__ import annotations

import torch

from ..sampling import normalize, sample, uniform


def solve_rho(target_p: torch.Tensor, draft_p: torch.Tensor, k: int, rounds: int = 3,
              points: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, beta(rho)) as float64 0-d tensors with rho >= rho*, no host synchronisation.

    Each round evaluates the function on a grid of `points` and keeps the bracketing cell, so
    the bracket shrinks by (points - 1) per round: (k - 1) / 63**3 = 4e-6 (k - 1) here. The upper
    end of the final bracket is returned: any rho >= rho* keeps the residual non-negative, so
    the verifier stays exact, and a rho that much above rho* lowers each acceptance probability
    by at most that relative amount. (The midpoint could fall just below rho*, where the
    residual would need clipping.) Few rounds and few tensor ops per round, because on a GPU
    this search is host-bound: every op is a kernel launch at every verified node.
    """
    t = target_p.double()
    d = draft_p.double()
    one = torch.ones((), dtype=torch.float64, device=t.device)
    if k == 1:
        return one, torch.minimum(d, t).sum()
    lo, hi = one.expand(points), torch.full((points,), float(k), dtype=torch.float64, device=t.device)
    steps = torch.linspace(0.0, 1.0, points, dtype=torch.float64, device=t.device)
    cell = torch.arange(2, device=t.device)
    for _ in range(rounds):
        grid = torch.lerp(lo, hi, steps)
        beta = (t / grid[:, None]).clamp_(max=d).sum(-1)  # sum_x min(D, T/rho) per grid point
        # f(rho) = 1 - (1 - beta)^k - rho beta >= 0  <=>  (1 - beta)^k + rho beta <= 1
        above = ((1.0 - beta).pow_(k).add_(grid * beta) <= 1.0).sum()
        ends = grid.gather(0, (above - 1).clamp_(0, points - 2) + cell)
        lo, hi = ends[0].expand(points), ends[1].expand(points)
    rho = hi[0]
    beta = (t / rho).clamp_(max=d).sum()
    return rho, beta


_RHO_GRAPHS: dict[tuple, tuple] = {}  # (device, V, k) -> (graph, t_in, d_in, rho_out, beta_out)


def solve_rho_graphed(t: torch.Tensor, d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """solve_rho replayed as a CUDA graph on a GPU (the same kernels, one launch instead of ~45).

    The search is a fixed sequence of tensor ops without host synchronisation, so it can be
    captured once per (device, vocabulary size, k); capture costs a few milliseconds. The
    returned tensors are the graph's outputs: valid until the next call with the same key.
    """
    if t.device.type != "cuda" or k == 1:
        return solve_rho(t, d, k)
    key = (t.device, t.numel(), k)
    entry = _RHO_GRAPHS.get(key)
    if entry is None:
        t_in, d_in = t.double().clone(), d.double().clone()
        stream = torch.cuda.Stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            solve_rho(t_in, d_in, k)  # warm-up outside the capture
        torch.cuda.current_stream(t.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rho, beta = solve_rho(t_in, d_in, k)
        entry = _RHO_GRAPHS[key] = (graph, t_in, d_in, rho, beta)
    graph, t_in, d_in, rho, beta = entry
    t_in.copy_(t)
    d_in.copy_(d)
    graph.replay()
    return rho, beta


def kseq_residual(target_p: torch.Tensor, draft_p: torch.Tensor, rho: torch.Tensor,
                  beta: torch.Tensor, k: int) -> torch.Tensor:
    t = target_p.double()
    # beta = 0 (draft and target disjoint): every draft is rejected and the residual is T;
    # decided on the device (gamma's limit is k, and min(D, T/rho) is all zeros then anyway)
    safe = beta.clamp_min(torch.finfo(torch.float64).tiny)
    gamma = torch.where(beta > 0, (1.0 - (1.0 - beta).pow(k)) / safe, torch.full_like(beta, float(k)))
    residual = (t - torch.minimum(draft_p.double(), t / rho) * gamma).clamp_min(0.0)
    return normalize(residual, t).float()


def kseq_verify(target_p: torch.Tensor, draft_p: torch.Tensor, proposals: list[int],
                settings: dict, gen: torch.Generator, rho_override: float | None = None):
    k = len(proposals)
    t, d = target_p.double(), draft_p.double()
    rho, beta = solve_rho_graphed(t, d, k)
    if rho_override is not None:  # only for tests that show a broken verifier is caught
        rho = torch.tensor(float(rho_override), dtype=torch.float64, device=target_p.device)
        beta = torch.minimum(d, t / rho).sum()
    idx = torch.tensor(proposals, dtype=torch.long).to(t.device, non_blocking=True)
    u = uniform(gen, (k,), t.device).double()
    accepted = (u * rho * d[idx] < t[idx]).tolist()  # the one host synchronisation
    if True in accepted:
        return accepted.index(True), None
    return None, sample(kseq_residual(t, d, rho, beta, k), gen)  # t, d: already float64
