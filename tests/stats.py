"""Goodness-of-fit helper for the exactness tests.

The threshold follows from the sample size through the chi-square distribution: with N samples
and expected counts N*p, Pearson's statistic is asymptotically chi-square with (bins - 1) degrees
of freedom under the null "the sampler reproduces p". Bins whose expected count is below 5 are
pooled so the approximation holds. A test fails when the p-value is below ALPHA, the stated
false-alarm rate per test (runs are seeded, so a given implementation always gives the same verdict).
"""

from __future__ import annotations

from collections import Counter

from scipy.stats import chi2

ALPHA = 1e-3


def chi_square_pvalue(samples: list[tuple], exact: dict[tuple, float]) -> tuple[float, float, int]:
    n = len(samples)
    counts = Counter(samples)
    impossible = [s for s in counts if exact.get(s, 0.0) == 0.0]
    if impossible:  # an outcome of probability zero is a certain failure
        return 0.0, float("inf"), 0
    bins, pooled_obs, pooled_exp = [], 0, 0.0
    for outcome, p in exact.items():
        if p == 0.0:
            continue
        if n * p >= 5:
            bins.append((counts.get(outcome, 0), n * p))
        else:
            pooled_obs += counts.get(outcome, 0)
            pooled_exp += n * p
    if pooled_exp > 0:
        bins.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in bins)
    dof = len(bins) - 1
    return float(chi2.sf(stat, dof)), stat, dof
