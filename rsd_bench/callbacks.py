"""Hydra callback: after a run or a sweep, merge the cell files, print a summary, draw the grid."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["pair", "dataset", "method", "L", "setting", "n_examples", "block_efficiency",
                   "mbsu", "token_rate", "token_rate_ratio", "accuracy", "accuracy_ratio"]


def summarize(results_dir: Path, plot_cfg=None) -> Path | None:
    from .plot import plot_grid
    from .results import collect

    cells_dir = results_dir / "cells"
    if not cells_dir.is_dir() or not any(cells_dir.glob("*.parquet")):
        log.warning("no results under %s", cells_dir)
        return None
    rows_df, cells = collect(results_dir)
    order = _sweep_order(rows_df)
    shown = [c for c in SUMMARY_COLUMNS if c in cells]
    cells = _sorted_for_display(cells, order)
    print("\n" + cells[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n")
    if plot_cfg is not None and not plot_cfg.enabled:
        return None
    where = f"results: {results_dir / 'results.parquet'} | cells: {results_dir / 'cells.csv'}"
    if (cells["method"].astype(str) == "ar").all():  # e.g. a baseline-only run: nothing to plot
        print(where, "| no grid: only AR cells")
        return None
    rows = order
    if plot_cfg is not None and plot_cfg.rows:
        rows = [tuple(r.split("/", 1)) for r in plot_cfg.rows]
    criterion = plot_cfg.criterion if plot_cfg is not None else "block_efficiency"
    paths = plot_grid(cells, results_dir / "grid", row_order=rows, criterion=criterion,
                      title=f"rsd-bench: {results_dir.name}")
    print(where, "| grid:", ", ".join(str(p) for p in paths))
    return paths[0] if paths else None


METHOD_ORDER = ["ar", "sd", "spectr", "rsd_c", "rsd_s"]


def _sorted_for_display(cells, order):
    rows = {key: i for i, key in enumerate(order or [])}
    row_rank = [rows.get((p, d), len(rows)) for p, d in zip(cells["pair"], cells["dataset"])]
    method_rank = [METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER) for m in cells["method"]]
    return (cells.assign(_row=row_rank, _method=method_rank)
            .sort_values(["_row", "pair", "dataset", "_method", "method", "L", "setting"], kind="stable")
            .drop(columns=["_row", "_method"]))


def _sweep_order(rows_df) -> list[tuple[str, str]] | None:
    """(pair, dataset) rows in the order the sweep ran them (Hydra job number)."""
    if "job_num" not in rows_df:
        return None
    first = rows_df.groupby(["pair", "dataset"], sort=False)["job_num"].min().sort_values(kind="stable")
    return list(first.index)


class CollectAndPlot(Callback):
    def on_run_end(self, config, **kwargs) -> None:
        summarize(Path(config.results_dir), config.plot)

    def on_multirun_end(self, config, **kwargs) -> None:
        summarize(Path(config.results_dir), config.plot)
