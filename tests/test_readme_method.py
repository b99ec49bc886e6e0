"""The README's plug-in method example runs as written and is exact."""

import re
from pathlib import Path

import pytest

from rsd_bench import load_pair
from rsd_bench.methods import get_method

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)


@pytest.fixture(scope="module")
def fan_chains():
    try:
        return get_method("fan_chains")
    except KeyError:
        exec(compile(readme_block("# my_methods.py"), "README.md", "exec"), {})
        return get_method("fan_chains")


def test_readme_api_example_runs():
    exec(compile(readme_block("from rsd_bench import load_pair"), "README.md", "exec"), {})


def test_readme_method_plugs_in(fan_chains):
    pair = load_pair("random-llama:seed=0", "random-llama:layers=1,hidden=32,seed=1", fast=False)
    out = pair.generate("Hallo", method="fan_chains", L=3, k=4, max_new_tokens=24, seed=1)
    assert out.new_tokens == 24 and out.draft_calls == 3 * out.target_calls
    assert max(out.nodes_per_call) <= 1 + 4 * 3
    greedy = pair.generate("Hallo", method="fan_chains", L=3, k=2, max_new_tokens=24, temperature=0)
    ar = pair.generate("Hallo", method="ar", max_new_tokens=24, temperature=0)
    assert greedy.tokens == ar.tokens


@pytest.mark.slow
def test_readme_method_is_exact(fan_chains):
    from stats import ALPHA, chi_square_pvalue
    from test_exactness import empirical

    samples, exact = empirical(fan_chains, 2, 2, 1.0, k=3)
    pvalue, stat, dof = chi_square_pvalue(samples, exact)
    assert pvalue >= ALPHA, f"chi2={stat:.1f} dof={dof} p={pvalue:.2e}"
