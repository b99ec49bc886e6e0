"""Every method reproduces the target's distribution exactly (statistical tests, seeded runs).

Tiny vocabularies, draft and target tables that differ a lot, a token the draft never proposes
and one the target never produces. For each setting, N seeded runs of the full engine give the
empirical distribution of the first tokens, compared with the exact product of table rows by a
chi-square test at false-alarm rate ALPHA (tests/stats.py). The same test must reject broken
verifiers, which shows it has teeth.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rsd_bench import device_graph, verify
from rsd_bench.engine import generate
from rsd_bench.lm import ModelRunner
from rsd_bench.methods import Method, get_method
from rsd_bench.methods.kseq import kseq_verify
from rsd_bench.sampling import normalize, sample_rows, uniform

from stats import ALPHA, chi_square_pvalue
from table_lm import TableLM, exact_distribution, random_table

VOCAB = 5
PROMPT = [0, 1]
RUNS = 20_000


@functools.lru_cache(maxsize=None)
def pair():
    target_table = random_table(VOCAB, 8, seed=0, sharpness=1.5, never=(3,))  # target never says 3
    draft_table = random_table(VOCAB, 8, seed=1, sharpness=1.5, never=(4,))  # draft never proposes 4
    return target_table, draft_table


def empirical(method, L, n_tokens, temperature, top_p=None, runs=RUNS, **params):
    target_table, draft_table = pair()
    target = ModelRunner(TableLM(target_table), vocab_size=VOCAB)
    draft = ModelRunner(TableLM(draft_table), vocab_size=VOCAB)
    out = []
    for seed in range(runs):
        r = generate(target, draft, PROMPT, method, L, vocab_size=VOCAB, temperature=temperature,
                     top_p=top_p, max_new_tokens=n_tokens, seed=seed, timing=False, **params)
        out.append(tuple(r.tokens))
    return out, exact_distribution(target_table, PROMPT, n_tokens, temperature, top_p)


SETTINGS = [
    # (method, L, params, temperature, tokens)
    ("ar", 0, {}, 1.0, 3),
    ("sd", 1, {}, 1.0, 3),
    ("sd", 3, {}, 0.6, 3),
    ("spectr", 1, {"K": 3}, 0.6, 3),
    ("spectr", 2, {"K": 2}, 1.0, 3),
    ("spectr", 3, {"K": 3}, 1.0, 3),
    ("rsd_c", 1, {"branching": [3]}, 1.0, 3),
    ("rsd_c", 2, {"branching": [3, 2]}, 1.0, 3),
    ("rsd_c", 3, {"branching": [2, 1, 2]}, 0.6, 3),
    ("rsd_s", 1, {"W": 3}, 1.0, 3),
    ("rsd_s", 2, {"W": 3}, 1.0, 3),
    ("rsd_s", 3, {"W": 2}, 0.6, 3),
    ("rsd_s", 3, {"W": 1}, 1.0, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,L,params,temperature,tokens", SETTINGS,
                         ids=[f"{m}-L{L}-{'-'.join(f'{k}{v}' for k, v in p.items())}-t{t}"
                              for m, L, p, t, _ in SETTINGS])
def test_method_is_exact(method, L, params, temperature, tokens):
    samples, exact = empirical(method, L, tokens, temperature, **params)
    pvalue, stat, dof = chi_square_pvalue(samples, exact)
    assert pvalue >= ALPHA, f"{method} L={L} {params} T={temperature}: chi2={stat:.1f} dof={dof} p={pvalue:.2e}"


POOLED_SETTINGS = [("sd", 3, {}, 0.6, 3), ("spectr", 2, {"K": 3}, 1.0, 3), ("rsd_c", 2, {"branching": [3, 2]}, 1.0, 3),
                   ("rsd_s", 2, {"W": 3}, 1.0, 3),
                   # the draft never proposes 4: one of 5 children per row is a dead row, kept for shapes
                   ("rsd_c", 2, {"branching": [5, 2]}, 1.0, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("method,L,params,temperature,tokens", POOLED_SETTINGS,
                         ids=[f"{m}-L{L}-t{t}" for m, L, _, t, _ in POOLED_SETTINGS])
def test_graphed_verification_body_is_exact(monkeypatch, method, L, params, temperature, tokens):
    """What a GPU runs as CUDA graphs (verification over padded shapes, draft levels; randomness
    from UniformPools), run plainly."""
    monkeypatch.setattr(device_graph, "FORCE_POOLED", True)
    monkeypatch.setattr(verify, "_GRAPHS", {})
    samples, exact = empirical(method, L, tokens, temperature, **params)
    pvalue, stat, dof = chi_square_pvalue(samples, exact)
    assert pvalue >= ALPHA, f"{method} L={L} {params} T={temperature}: chi2={stat:.1f} dof={dof} p={pvalue:.2e}"
    assert any(verify._GRAPHS.values()), "the pooled path did not run"


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("rsd_s", {"W": 3}), ("rsd_c", {"branching": [3, 2]})])
def test_exact_with_top_p(method, params):
    """top-p zeroes tokens of the draft too: levels carry dead rows (never nodes, children dead)."""
    samples, exact = empirical(method, 2, 2, 1.0, top_p=0.8, **params)
    pvalue, stat, dof = chi_square_pvalue(samples, exact)
    assert pvalue >= ALPHA, f"chi2={stat:.1f} dof={dof} p={pvalue:.2e}"


# --- the same test catches broken verifiers -------------------------------------------------

def rrs_without_residual_update(target_p, draft_p, proposals, settings, gen):
    """Recursive rejection sampling that forgets to update R (and Q) after a rejection."""
    choice = torch.full((proposals.shape[0],), -1, dtype=torch.long)
    for j in range(proposals.shape[1]):
        x = proposals[:, j : j + 1].clamp_min(0)
        u = uniform(gen, (proposals.shape[0],))
        accept = (proposals[:, j] >= 0) & (choice < 0) & (u * draft_p.gather(1, x)[:, 0] < target_p.gather(1, x)[:, 0])
        choice = torch.where(accept, j, choice)
    return choice, sample_rows(normalize((target_p - draft_p).clamp_min(0), target_p), gen)


@pytest.mark.slow
def test_detects_rrs_without_residual_update():
    rsd_c = get_method("rsd_c")
    broken = Method(name="rsd_c_broken", label="broken", draft_tree=rsd_c.draft_tree,
                    verify_children=rrs_without_residual_update, params=rsd_c.params,
                    resolve=rsd_c.resolve)
    samples, exact = empirical(broken, 2, 2, 1.0, branching=[3, 2])
    pvalue, stat, dof = chi_square_pvalue(samples, exact)
    assert pvalue < ALPHA, f"broken RRS went unnoticed: chi2={stat:.1f} dof={dof} p={pvalue:.2e}"


@pytest.mark.slow
def test_detects_spectr_with_rho_fixed_at_one():
    spectr = get_method("spectr")
    broken = Method(name="spectr_rho1", label="broken", draft_tree=spectr.draft_tree,
                    verify_children=functools.partial(kseq_verify, rho_override=1.0),
                    params=spectr.params, resolve=spectr.resolve)
    samples, exact = empirical(broken, 2, 2, 1.0, K=3)
    pvalue, stat, dof = chi_square_pvalue(samples, exact)
    assert pvalue < ALPHA, f"SpecTr with rho=1 went unnoticed: chi2={stat:.1f} dof={dof} p={pvalue:.2e}"
