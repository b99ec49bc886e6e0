"""The order check (`rsd-bench order`) and the block-efficiency standard error it relies on."""

import math

import numpy as np
import pandas as pd
import pytest

from rsd_bench.cli import main
from rsd_bench.ordering import format_order, order_summary, order_table
from rsd_bench.plot import load_cells
from rsd_bench.results import BOOTSTRAP_RESAMPLES, ratio_of_sums_se


def test_ratio_of_sums_se_matches_the_plug_in_standard_error():
    """With a constant denominator the ratio is a mean / c, whose bootstrap SE converges to
    sd0(x) / (c sqrt(n)) (sd0: population sd of the sample). The bootstrap's own Monte Carlo
    error is a relative 1/sqrt(2(B-1)); allow 5 of those."""
    rng = np.random.default_rng(1)
    n, c = 50, 40.0
    x = rng.poisson(70, size=n).astype(float)
    want = x.std(ddof=0) / (c * math.sqrt(n))
    got = ratio_of_sums_se(x, np.full(n, c))
    assert abs(got / want - 1) < 5 / math.sqrt(2 * (BOOTSTRAP_RESAMPLES - 1))
    assert math.isnan(ratio_of_sums_se([1.0], [1.0]))
    assert ratio_of_sums_se([3.0, 3.0, 3.0], [2.0, 2.0, 2.0]) == 0.0


def _cells():
    rows = []
    # (dataset, L) -> method -> {setting: value}
    values = {
        ("wmt", 2): {"rsd_s": {"W=2": 1.70, "W=4": 1.90}, "rsd_c": {"b=2-1": 1.80, "b=4-1": 1.85},
                     "spectr": {"K=2": 1.60, "K=4": 1.75}, "sd": {"": 1.50}},
        ("wmt", 3): {"rsd_s": {"W=2": 1.60, "W=4": 1.70}, "rsd_c": {"b=2-1-1": 1.50, "b=4-1-1": 1.95},
                     "spectr": {"K=2": 1.65, "K=4": 1.80}, "sd": {"": 1.55}},
    }
    for (ds, L), methods in values.items():
        for m, settings in methods.items():
            for setting, v in settings.items():
                width = int(setting.split("=")[1][0]) if setting else None
                rows.append({"pair": "p", "dataset": ds, "L": L, "method": m, "setting": setting,
                             "K": width if m == "spectr" else None,
                             "width": width if m in ("rsd_c", "rsd_s") else None,
                             "block_efficiency": v, "block_efficiency_se": 0.02, "n_examples": 50})
    rows.append({"pair": "p", "dataset": "wmt", "L": 0, "method": "ar", "setting": "",
                 "block_efficiency": 1.0, "block_efficiency_se": 0.0, "n_examples": 50})
    return pd.DataFrame(rows)


def test_order_table_picks_the_best_setting_and_scores_the_gaps():
    t = order_table(_cells())
    assert list(t["L"]) == [2, 3]
    l2, l3 = t.iloc[0], t.iloc[1]
    assert l2["rsd_s_setting"] == "W=4" and l2["rsd_c_setting"] == "b=4-1"
    assert l2["holds"] and l2["reversed_beyond_2se"] == 0
    # 1.90 vs 1.85 with SE 0.02 each: z = 0.05 / (0.02 sqrt 2)
    assert l2["z_rsd_s_rsd_c"] == pytest.approx(0.05 / (0.02 * math.sqrt(2)))
    # L=3: RSD-S 1.70 < RSD-C 1.95 (z = -8.8): the order is contradicted there
    assert not l3["holds"] and l3["reversed_beyond_2se"] == 1 and l3["min_z"] < -2
    s = order_summary(t)
    assert s["cases"] == 2 and s["holds"] == 1 and s["gaps"] == 6
    assert s["gaps_for"] + s["gaps_unresolved"] + s["gaps_against"] == 6 and s["gaps_against"] == 1
    text = format_order(t)
    assert "holds in 1 of 2 cases" in text and "1.900±0.020 (W=4)" in text


def test_order_table_with_a_query_compares_one_width():
    t = order_table(_cells().query("method == 'sd' or K == 2 or width == 2"))
    assert set(t["rsd_s_setting"]) == {"W=2"} and set(t["spectr_setting"]) == {"K=2"}
    assert not t["holds"].any()
    t = order_table(_cells(), order=["rsd_c", "sd"])  # any order of any methods
    assert t["holds"].all() and "rsd_s" not in t


def test_cli_order_and_plot_query(tmp_path, capsys):
    path = tmp_path / "cells.csv"
    _cells().to_csv(path, index=False)
    main(["order", str(path), "--query", "method == 'sd' or K == 4 or width == 4",
          "--csv", str(tmp_path / "order.csv")])
    out = capsys.readouterr().out
    assert "holds in 1 of 2 cases" in out
    assert len(pd.read_csv(tmp_path / "order.csv")) == 2
    assert len(load_cells(path, "method == 'sd'")) == 2
    with pytest.raises(ValueError, match="leaves no cells"):
        load_cells(path, "method == 'nope'")
    with pytest.raises(SystemExit, match="no such file"):
        main(["order", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit, match="bad --query"):
        main(["order", str(path), "--query", "no_such_column == 1"])
