"""The RSD paper's figure grid from a per-cell table (see :mod:`rsd_bench.results`).

Rows are (pair, dataset); columns are block efficiency, MBSU, token rate (ratio to AR) and
accuracy (ratio to AR); the x axis is the draft length L. Each method is one line through the
best setting per (pair, dataset, method, L) (:func:`rsd_bench.results.select_best`). AR is
not a line: a thin grey dashed line at 1.0 marks it in every panel.

Only the object-oriented matplotlib API with the Agg canvas is used (no pyplot, no global
backend switch), so plotting works headless and leaves no figures open.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rsd_bench.results import aggregate, read_results, select_best

__all__ = [
    "METHOD_STYLES",
    "PANELS",
    "method_style",
    "build_grid_figure",
    "plot_grid",
    "plot_results",
]

#: Paper styles of the known methods (label, color, linestyle, marker). Methods not listed get
#: a style from :data:`_FALLBACK_*` cycles, so new methods plot without code changes.
METHOD_STYLES: dict[str, dict] = {
    "sd": dict(label="SD", color="tab:orange", linestyle=":", marker=None),
    "spectr": dict(label="SpecTr", color="tab:red", linestyle="--", marker=None),
    "rsd_c": dict(label="RSD-C", color="tab:green", linestyle="--", marker="D"),
    "rsd_s": dict(label="RSD-S", color="tab:blue", linestyle="-", marker="o"),
}
_FALLBACK_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
_FALLBACK_LINESTYLES = ["-.", "-", "--", ":"]
_FALLBACK_MARKERS = ["s", "^", "v", "P", "X", "*"]

#: Columns of the grid: (cells column, column title, fixed y-limits or None for autoscale).
PANELS: list[tuple[str, str, tuple[float, float] | None]] = [
    ("block_efficiency", "Block efficiency", None),
    ("mbsu", "MBSU", None),
    ("token_rate_ratio", "Token rate (× AR)", None),
    ("accuracy_ratio", "Accuracy (× AR)", (0.7, 1.3)),
]

_AR_METHODS = {"ar"}


def method_style(method: str, unknown_index: int = 0) -> dict:
    """Line style of ``method``: the paper's for known methods, else the ``unknown_index``-th
    style of the fallback cycle (label = the method name)."""
    if method in METHOD_STYLES:
        return dict(METHOD_STYLES[method])
    i = unknown_index
    return dict(
        label=str(method),
        color=_FALLBACK_COLORS[i % len(_FALLBACK_COLORS)],
        linestyle=_FALLBACK_LINESTYLES[i % len(_FALLBACK_LINESTYLES)],
        marker=_FALLBACK_MARKERS[i % len(_FALLBACK_MARKERS)],
    )


def _ordered_methods(methods) -> list[str]:
    present = list(dict.fromkeys(str(m) for m in methods))
    known = [m for m in METHOD_STYLES if m in present]
    return known + [m for m in present if m not in METHOD_STYLES]


def _row_keys(cells: pd.DataFrame, row_order) -> list[tuple[str, str]]:
    present = list(dict.fromkeys(zip(cells["pair"].astype(str), cells["dataset"].astype(str))))
    if row_order is None:
        return present
    wanted = [(str(p), str(d)) for p, d in row_order]
    rows = [r for r in dict.fromkeys(wanted) if r in present]
    left_out = [r for r in present if r not in wanted]
    if left_out:
        warnings.warn(f"plot: rows not in row_order are left out: {left_out}", stacklevel=3)
    return rows


def _row_label(pair: str, dataset: str, width: int = 26) -> str:
    """'pair / dataset', wrapped into lines of at most ``width`` characters where possible
    (breaking after '+', '/', ',' or spaces) so long model names fit the row height."""
    pieces = re.findall(r"[^+/, ]+[+/,]?\s*|[+/,]\s*|\s+", f"{pair} / {dataset}")
    lines, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + len(piece.rstrip()) > width:
            lines.append(cur.rstrip())
            cur = piece.lstrip()
        else:
            cur += piece
    lines.append(cur.rstrip())
    return "\n".join(line for line in lines if line)


def _numeric(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def build_grid_figure(
    cells: pd.DataFrame,
    row_order: list[tuple[str, str]] | None = None,
    criterion: str = "block_efficiency",
    title: str | None = None,
    x: str = "L",
    x_label: str = "Draft length L",
) -> Figure:
    """Build (but do not save) the grid figure; ``plot_grid`` saves it. Returns the Figure.

    ``cells`` is the per-cell table of :func:`rsd_bench.results.aggregate`. Rows: (pair,
    dataset) in ``row_order`` (only those present) or in order of first appearance, skipping
    pairs/datasets that have AR cells only. Panels whose values are all NaN stay empty.
    """
    cells = cells.reset_index(drop=True)
    methods_col = cells["method"].astype(str)
    lines = cells[~methods_col.isin(_AR_METHODS)]
    lines = lines[pd.notna(pd.to_numeric(lines[x], errors="coerce"))]
    rows = _row_keys(lines, row_order) if len(lines) else []
    if not rows:
        raise ValueError("plot: no non-AR cells to plot")
    best = select_best(lines, criterion=criterion, by=("pair", "dataset", "method", x))
    methods = _ordered_methods(best["method"])
    styles, n_unknown = {}, 0
    for m in methods:
        styles[m] = method_style(m, n_unknown)
        n_unknown += m not in METHOD_STYLES
    xs_all = sorted({int(v) for v in _numeric(best[x]) if not math.isnan(v)})

    n_rows, n_cols = len(rows), len(PANELS)
    fig = Figure(figsize=(3.2 * n_cols, 2.3 * n_rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, sharex=True, squeeze=False))
    pair_s, ds_s = best["pair"].astype(str), best["dataset"].astype(str)

    for r, (pair, dataset) in enumerate(rows):
        sub = best[(pair_s == pair) & (ds_s == dataset)]
        for c, (col, col_title, ylim) in enumerate(PANELS):
            ax = axes[r, c]
            ax.axhline(1.0, color="0.6", linestyle="--", linewidth=0.8, zorder=1)
            values = []
            for m in methods:
                pts = sub[sub["method"].astype(str) == m]
                if col not in pts:
                    continue
                xv, yv = _numeric(pts[x]), _numeric(pts[col])
                ok = ~np.isnan(xv) & ~np.isnan(yv)
                if not ok.any():
                    continue
                order = np.argsort(xv[ok])
                xv, yv = xv[ok][order], yv[ok][order]
                st = styles[m]
                marker = st["marker"] or ("o" if len(xv) == 1 else None)
                ax.plot(xv, yv, color=st["color"], linestyle=st["linestyle"], marker=marker,
                        markersize=4.5, linewidth=1.6, label=st["label"], zorder=3)
                values.extend(yv.tolist())
            if ylim is not None:
                lo, hi = ylim
                if values:
                    lo, hi = min(lo, min(values) - 0.05), max(hi, max(values) + 0.05)
                ax.set_ylim(lo, hi)
            elif values:
                lo, hi = min(1.0, min(values)), max(1.0, max(values))
                pad = 0.06 * (hi - lo) if hi > lo else 0.1
                ax.set_ylim(lo - pad, hi + pad)
            else:
                ax.set_ylim(0.9, 1.1)
            ax.grid(True, color="0.92", linewidth=0.6, zorder=0)
            ax.tick_params(labelsize=8)
            if r == 0:
                ax.set_title(col_title, fontsize=10, fontweight="bold")
            if r == n_rows - 1:
                ax.set_xlabel(x_label, fontsize=9)
        axes[r, 0].set_ylabel(_row_label(pair, dataset), fontsize=9, fontweight="bold")

    if xs_all:
        axes[0, 0].set_xticks(xs_all)
        axes[0, 0].set_xlim(xs_all[0] - 0.25, xs_all[-1] + 0.25)

    handles = [Line2D([], [], color=styles[m]["color"], linestyle=styles[m]["linestyle"],
                      marker=styles[m]["marker"], markersize=5, linewidth=1.6) for m in methods]
    labels = [styles[m]["label"] for m in methods]
    handles.append(Line2D([], [], color="0.6", linestyle="--", linewidth=0.8))
    labels.append("AR (= 1)")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False,
               fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _stem_path(out_path_stem) -> Path:
    p = Path(out_path_stem)
    if p.suffix.lower() in {".png", ".pdf"}:
        p = p.with_suffix("")
    return p


def plot_grid(
    cells: pd.DataFrame,
    out_path_stem,
    row_order: list[tuple[str, str]] | None = None,
    criterion: str = "block_efficiency",
    title: str | None = None,
    dpi: int = 150,
) -> list[Path]:
    """Draw the grid (:func:`build_grid_figure`) and write ``<stem>.png`` and ``<stem>.pdf``
    (parent directories created). Returns the two paths."""
    stem = _stem_path(out_path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = build_grid_figure(cells, row_order=row_order, criterion=criterion, title=title)
    paths = []
    for ext in (".png", ".pdf"):
        path = stem.parent / (stem.name + ext)
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def load_cells(results_path, query: str | None = None) -> pd.DataFrame:
    """The per-cell table from ``cells.parquet`` / ``cells.csv`` / ``results.parquet`` / a per-job
    file / a sweep directory, optionally filtered by a pandas ``query`` over its columns
    (e.g. ``"method in ['ar', 'sd'] or K == 3 or width == 3"``: one tree width per method)."""
    cells = _load_cells(results_path)
    if query:
        try:
            cells = cells.query(query)
        except Exception as e:  # pandas raises several types for a bad expression
            raise ValueError(f"bad --query {query!r}: {e}. Columns: {', '.join(map(str, cells.columns))}") from e
        if cells.empty:
            raise ValueError(f"--query {query!r} leaves no cells")
    return cells


def _load_cells(results_path) -> pd.DataFrame:
    path = Path(results_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; give a sweep directory "
                                "(runs/<sweep>), its cells.parquet / cells.csv, or results.parquet")
    if path.is_dir():
        for name in ("cells.parquet", "cells.csv"):
            if (path / name).is_file():
                return _load_cells(path / name)
        return aggregate(read_results(path))
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path)
    else:
        df = pd.read_parquet(path)
    if "example_id" in df.columns or "n_examples" not in df.columns:
        df = aggregate(df)
    return df


def plot_results(
    results_path,
    out_dir,
    stem: str = "grid",
    row_order: list[tuple[str, str]] | None = None,
    criterion: str = "block_efficiency",
    title: str | None = None,
    query: str | None = None,
) -> list[Path]:
    """Plot from a file: ``cells.parquet`` / ``cells.csv`` (per-cell) or ``results.parquet`` /
    a per-job file (per-example rows, aggregated first), or a sweep directory (its
    ``cells.parquet`` / ``cells.csv`` if present, else its per-job files aggregated).
    ``query`` filters the cells first (:func:`load_cells`). Writes ``<out_dir>/<stem>.png`` and
    ``.pdf`` and returns the paths."""
    cells = load_cells(results_path, query)
    return plot_grid(cells, Path(out_dir) / stem, row_order=row_order, criterion=criterion,
                     title=title)
