"""Does a claimed order of methods hold? One row per (pair, dataset, L) with each method's value,
its standard error, and z-scores of the gaps between neighbours in the claimed order.

The paper claims RSD-S >= RSD-C >= SpecTr >= SD in block efficiency at every draft length. A
measured order means little without noise: with 50 examples a cell's block efficiency has a
standard error of about 0.025, so gaps under ~0.07 (2 SE of a difference) are ties.

One cell per (pair, dataset, method, L) is compared: the best setting by ``best_by`` (as the
plot does), or whatever cells ``query`` leaves (e.g. one tree width). Picking the best of several
settings biases each picked value upward by about the same amount for every method that has the
same number of settings; a method with a single setting (SD) is not lifted.
"""

from __future__ import annotations

import math

import pandas as pd

from .results import select_best

PAPER_ORDER: tuple[str, ...] = ("rsd_s", "rsd_c", "spectr", "sd")


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def order_table(cells: pd.DataFrame, order: tuple[str, ...] | list[str] = PAPER_ORDER,
                metric: str = "block_efficiency", best_by: str | None = None,
                query: str | None = None) -> pd.DataFrame:
    """Per (pair, dataset, L): ``<method>``, ``<method>_se``, ``<method>_setting`` for each method
    of ``order`` present, ``z_<a>_<b>`` = (a - b) / sqrt(se_a^2 + se_b^2) for neighbours a, b,
    ``holds`` (every neighbour a >= b), ``min_z`` and ``reversed_beyond_2se`` (neighbour gaps
    with z < -2: the order is contradicted, not just unresolved). The standard error column is
    ``<metric>_se`` (NaN z-scores if the cells table has none)."""
    order = list(order)
    if metric not in cells:
        raise KeyError(f"metric column {metric!r} not in the cells table")
    if query:
        cells = cells.query(query)
    cells = cells[cells["method"].astype(str).isin(order)]
    cells = select_best(cells, criterion=best_by or metric)
    se_col = f"{metric}_se"
    rows = []
    for (pair, dataset, L), g in cells.groupby(["pair", "dataset", "L"], sort=False):
        row: dict = {"pair": pair, "dataset": dataset, "L": int(L)}
        present = []
        for m in order:
            hit = g[g["method"].astype(str) == m]
            if hit.empty:
                continue
            c = hit.iloc[0]
            present.append(m)
            row[m] = _num(c[metric])
            row[f"{m}_se"] = _num(c[se_col]) if se_col in c else float("nan")
            row[f"{m}_setting"] = str(c["setting"]) if "setting" in c and pd.notna(c["setting"]) else ""
        zs, holds = [], True
        for a, b in zip(present, present[1:]):
            se = math.hypot(row[f"{a}_se"], row[f"{b}_se"])
            z = (row[a] - row[b]) / se if se > 0 else float("nan")
            row[f"z_{a}_{b}"] = z
            zs.append(z)
            holds = holds and row[a] >= row[b]
        row["methods"] = len(present)
        row["holds"] = holds
        row["min_z"] = min((z for z in zs if not math.isnan(z)), default=float("nan"))
        row["reversed_beyond_2se"] = sum(z < -2 for z in zs)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["pair", "dataset", "L"], kind="stable").reset_index(drop=True) \
        if rows else pd.DataFrame(rows)


def order_summary(table: pd.DataFrame, order: tuple[str, ...] | list[str] = PAPER_ORDER) -> dict:
    """Counts over an :func:`order_table`: cases, cases where the order holds, neighbour gaps
    resolved in its favour (z > 2), unresolved (|z| <= 2) and contradicted (z < -2)."""
    order = list(order)
    zcols = [f"z_{a}_{b}" for a, b in zip(order, order[1:]) if f"z_{a}_{b}" in table]
    z = pd.concat([table[c] for c in zcols]).dropna() if zcols else pd.Series(dtype=float)
    return {
        "cases": int(len(table)),
        "holds": int(table["holds"].sum()) if len(table) else 0,
        "gaps": int(len(z)),
        "gaps_for": int((z > 2).sum()),
        "gaps_unresolved": int((z.abs() <= 2).sum()),
        "gaps_against": int((z < -2).sum()),
        "mean_by_method": {m: float(table[m].mean()) for m in order if m in table},
    }


def format_order(table: pd.DataFrame, order: tuple[str, ...] | list[str] = PAPER_ORDER) -> str:
    """A plain-text table: value ± SE (setting) per method, neighbour z-scores, holds."""
    order = [m for m in order if m in table]
    lines = []
    head = ["pair", "dataset", "L"] + order + [f"z {a}>{b}" for a, b in zip(order, order[1:])] + ["holds"]
    body = []
    for _, r in table.iterrows():
        cells = [str(r["pair"]), str(r["dataset"]), str(r["L"])]
        for m in order:
            v = r.get(m)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
                continue
            s = f"{v:.3f}±{r[f'{m}_se']:.3f}"
            if r.get(f"{m}_setting"):
                s += f" ({r[f'{m}_setting']})"
            cells.append(s)
        cells += [f"{r.get(f'z_{a}_{b}', float('nan')):+.1f}" for a, b in zip(order, order[1:])]
        cells.append("yes" if r["holds"] else "no")
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for cells in [head] + body:
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    s = order_summary(table, order)
    lines.append("")
    lines.append(f"order {' >= '.join(order)} holds in {s['holds']} of {s['cases']} cases; neighbour gaps: "
                 f"{s['gaps_for']} for (z > 2), {s['gaps_unresolved']} unresolved (|z| <= 2), "
                 f"{s['gaps_against']} against (z < -2)")
    lines.append("mean: " + ", ".join(f"{m} {v:.3f}" for m, v in s["mean_by_method"].items()))
    return "\n".join(lines)
