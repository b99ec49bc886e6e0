import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsd_bench.plot import METHOD_STYLES, build_grid_figure, method_style, plot_grid, plot_results
from rsd_bench.results import write_rows

ROWS = [("llama2-7b/68m", "wmt"), ("llama2-7b/68m", "xsum"), ("llama2-13b/160m", "wmt")]
# paper-like block efficiency at L=5
PAPER_BE = {"sd": 1.8, "spectr": 2.2, "rsd_c": 2.5, "rsd_s": 2.8}


def synthetic_cells(methods=("sd", "spectr", "rsd_c", "rsd_s"), rows=ROWS, Ls=(2, 3, 4, 5)):
    recs = []
    for pair, ds in rows:
        recs.append(dict(pair=pair, dataset=ds, method="ar", L=0, setting="", block_efficiency=1.0,
                         mbsu=1.0, token_rate_ratio=1.0, accuracy_ratio=1.0))
        for j, m in enumerate(methods):
            top = PAPER_BE.get(m, 2.0 + 0.1 * j)
            for L in Ls:
                for s, bonus in (("a", 0.0), ("b", 0.05)):
                    be = 1 + (top - 1) * L / 5 + bonus
                    recs.append(dict(pair=pair, dataset=ds, method=m, L=L, setting=s,
                                     block_efficiency=be, mbsu=be / (1 + 0.02 * L),
                                     token_rate_ratio=be / (1 + 0.25 * L),
                                     accuracy_ratio=1.0 + 0.03 * math.sin(L + j)))
    return pd.DataFrame(recs)


def test_grid_shape_and_titles():
    fig = build_grid_figure(synthetic_cells(), title="fixed draft length")
    axes = fig.axes
    assert len(axes) == len(ROWS) * 4
    assert [a.get_title() for a in axes[:4]] == ["Block efficiency", "MBSU", "Token rate (× AR)", "Accuracy (× AR)"]
    # accuracy panel spans 0.7..1.3
    assert axes[3].get_ylim() == pytest.approx((0.7, 1.3))
    # other panels start at or below 1
    for a in axes:
        assert a.get_ylim()[0] <= 1.0
    # integer x ticks at the draft lengths present
    assert list(axes[0].get_xticks()) == [2, 3, 4, 5]
    # one line per method + the AR reference line in every panel
    lines = axes[0].get_lines()
    labels = [l.get_label() for l in lines if not l.get_label().startswith("_")]
    assert labels == ["SD", "SpecTr", "RSD-C", "RSD-S"]
    # the best setting (b: +0.05) is plotted
    rsd_s = [l for l in lines if l.get_label() == "RSD-S"][0]
    assert rsd_s.get_ydata()[-1] == pytest.approx(2.85)
    assert rsd_s.get_color() == METHOD_STYLES["rsd_s"]["color"]
    # legend at the bottom of the figure
    assert len(fig.legends) == 1
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:4] == ["SD", "SpecTr", "RSD-C", "RSD-S"]


def test_row_order_respected_and_filtered():
    order = [("llama2-13b/160m", "wmt"), ("missing", "wmt"), ("llama2-7b/68m", "wmt")]
    with pytest.warns(UserWarning):  # ("llama2-7b/68m", "xsum") is left out
        fig = build_grid_figure(synthetic_cells(), row_order=order)
    assert len(fig.axes) == 2 * 4
    ylabels = [fig.axes[i].get_ylabel() for i in (0, 4)]
    assert "llama2-13b/160m" in ylabels[0] and "wmt" in ylabels[0]
    assert "llama2-7b/68m" in ylabels[1]
    # default: first appearance
    fig = build_grid_figure(synthetic_cells(rows=list(reversed(ROWS))))
    assert "llama2-13b/160m" in fig.axes[0].get_ylabel()


def test_plot_grid_writes_png_and_pdf(tmp_path):
    paths = plot_grid(synthetic_cells(), tmp_path / "out" / "grid", title="test")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
    assert paths[1].read_bytes()[:4] == b"%PDF"


def test_unknown_method_plots():
    cells = synthetic_cells(methods=("sd", "rsd_s", "my_new_method", "another"))
    fig = build_grid_figure(cells)
    labels = [l.get_label() for l in fig.axes[0].get_lines() if not l.get_label().startswith("_")]
    assert labels == ["SD", "RSD-S", "my_new_method", "another"]
    st1, st2 = method_style("my_new_method", 0), method_style("another", 1)
    assert st1["color"] != st2["color"]


def test_nan_ratios_give_empty_panels():
    cells = synthetic_cells()
    cells["token_rate_ratio"] = np.nan
    cells.loc[cells["pair"] == "llama2-7b/68m", "accuracy_ratio"] = np.nan
    fig = build_grid_figure(cells)
    tr = fig.axes[2]
    assert [l.get_label() for l in tr.get_lines() if not l.get_label().startswith("_")] == []
    assert len(fig.axes) == len(ROWS) * 4


def test_single_draft_length_and_ar_only_rows():
    cells = synthetic_cells(Ls=(3,))
    extra = pd.DataFrame([dict(pair="p", dataset="d", method="ar", L=0, setting="", block_efficiency=1.0,
                               mbsu=1.0, token_rate_ratio=1.0, accuracy_ratio=1.0)])
    fig = build_grid_figure(pd.concat([cells, extra], ignore_index=True))
    assert len(fig.axes) == len(ROWS) * 4  # the AR-only row is skipped
    line = [l for l in fig.axes[0].get_lines() if l.get_label() == "SD"][0]
    assert line.get_marker() not in (None, "None", "")  # a single point stays visible


def test_plot_results_from_files(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_results import all_cells

    import rsd_bench.results as R

    sweep = tmp_path / "sweep"
    for rows in all_cells():
        write_rows(rows, sweep / f"{rows[0]['cell_id']}.parquet")
    # per-job rows only -> aggregated on the fly
    paths = plot_results(sweep, tmp_path / "figs", stem="from_rows")
    assert all(p.stat().st_size > 0 for p in paths)
    R.collect(sweep)
    for src, stem in ((sweep / "cells.parquet", "cells_pq"), (sweep / "cells.csv", "cells_csv"),
                      (sweep / "results.parquet", "results_pq")):
        with pytest.warns(UserWarning, match="left out"):
            paths = plot_results(src, tmp_path / "figs", stem=stem, row_order=[("llama2-7b/68m", "xsum")])
        assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
        assert all(p.stat().st_size > 0 for p in paths)
