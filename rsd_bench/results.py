"""Tidy result tables: per-example rows, per-cell aggregates, and their files.

A *cell* is one point of a sweep: one (pair, dataset, method, draft length, setting, sampling,
device, ...) configuration, identified by ``cell_id`` (a hash of the cell config). The runner
decodes every example of a cell and writes the cell's rows, one per example (columns:
:data:`EXAMPLE_COLUMNS`), into one *per-job* parquet file with :func:`write_rows` once the
cell is finished. :func:`collect` then reads all per-job files of a sweep directory and writes

* ``results.parquet``: all per-example rows,
* ``cells.parquet`` and ``cells.csv``: one row per cell (columns: :data:`CELL_COLUMNS`),

into that directory. These aggregate file names (:data:`AGGREGATE_FILES`) are never read back
as per-job files. All writes are atomic (temp file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rsd_bench import metrics

__all__ = [
    "EXAMPLE_COLUMNS",
    "CONFIG_COLUMNS",
    "CELL_COLUMNS",
    "AR_MATCH_COLUMNS",
    "AGGREGATE_FILES",
    "write_rows",
    "read_results",
    "aggregate",
    "collect",
    "select_best",
    "ratio_of_sums_se",
    "completed_cells",
]

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

#: Columns of a per-example row (one row per (cell, example)), name -> description.
EXAMPLE_COLUMNS: dict[str, str] = {
    # -- cell config (identical for all rows of a cell) --
    "sweep": "name of the sweep the cell belongs to (e.g. 'fixed_length')",
    "cell_id": "hash of the cell config; identifies the cell",
    "pair": "label of the (target, draft) model pair",
    "target_id": "target model id (e.g. meta-llama/Llama-2-7b-hf)",
    "draft_id": "draft model id ('' or null for ar)",
    "dataset": "dataset name (wmt, xsum, dolly, ...)",
    "method": "decoding method: ar, sd, spectr, rsd_c, rsd_s, ...",
    "L": "draft length = tree depth = sequential draft calls per block (int; 0 for ar)",
    "K": "number of independent draft chains for spectr (int or null)",
    "branching": "rsd_c branching factors per level, e.g. '2-2-1' (str or null)",
    "width": "rsd_s beam width W, or the width of rsd_c's branching rule (int or null)",
    "setting": "method setting label, e.g. 'K=3', 'b=2-2-1', 'W=4'; '' for sd/ar",
    "temperature": "sampling temperature (float)",
    "top_p": "top-p (nucleus) threshold (float or null)",
    "seed": "random seed of the cell (int)",
    "dtype": "model dtype (e.g. bfloat16)",
    "device_name": "accelerator name (e.g. NVIDIA H100 80GB HBM3)",
    "max_new_tokens": "generation limit per example (int)",
    "target_params": "parameter count of the target model (int)",
    "draft_params": "parameter count of the draft model (int; 0 for ar)",
    "torch_version": "torch.__version__",
    "transformers_version": "transformers.__version__",
    "rsd_bench_version": "rsd_bench version",
    "git_commit": "git commit of the rsd-bench checkout",
    "accuracy_metric": "task metric of the dataset: bleu | rouge2 | rougeL",
    # -- per example --
    "example_id": "dataset id of the example (str)",
    "example_index": "position of the example in the evaluated subset (int)",
    "prompt_tokens": "prompt length in tokens (int)",
    "new_tokens": "generated tokens (int)",
    "target_calls": "target forward calls in the decode loop, prefill excluded (int)",
    "draft_calls": "draft forward calls in the decode loop, prefill excluded (int)",
    "decode_seconds": "GPU-synchronised wall clock of the decode loop, prefill excluded (s)",
    "prefill_seconds": "GPU-synchronised wall clock of the prompt prefill (s)",
    "draft_seconds": "part of decode_seconds spent in draft calls (s)",
    "verify_seconds": "part of decode_seconds spent in target (verification) calls (s)",
    "overhead_seconds": "rest of decode_seconds: acceptance walk, cache bookkeeping, ... (s)",
    "tokens_per_block": "JSON list: tokens produced by each target call, in order",
    "depth_attempts": "JSON list: element d = times the walk reached depth d with candidates",
    "depth_accepts": "JSON list: element d = times a candidate was accepted at depth d",
    "nodes_per_call": "mean number of tree nodes verified per target call (float)",
    "block_efficiency": "new_tokens / target_calls",
    "mbsu": "block_efficiency / (1 + draft_params / target_params * L)",
    "token_rate": "new_tokens / decode_seconds (tokens/s)",
    "accuracy": "sentence-level task score of the prediction, 0-100",
    "prediction": "decoded generation (str)",
    "job_num": "Hydra job number that produced the row (orders the grid's rows as the sweep ran)",
    "reference": "reference output (str)",
}

#: The config part of :data:`EXAMPLE_COLUMNS` (carried into the per-cell table).
CONFIG_COLUMNS: list[str] = list(EXAMPLE_COLUMNS)[: list(EXAMPLE_COLUMNS).index("example_id")]

#: A cell's AR baseline is the ``method == 'ar'`` cell with equal values in these columns.
AR_MATCH_COLUMNS: list[str] = [
    "pair", "dataset", "device_name", "temperature", "top_p", "max_new_tokens", "dtype",
]

#: Columns of the per-cell table written by :func:`aggregate`, name -> description
#: (in addition to :data:`CONFIG_COLUMNS`, which come first).
CELL_COLUMNS: dict[str, str] = {
    "n_examples": "number of examples (rows) of the cell",
    "prompt_tokens": "sum of prompt tokens",
    "new_tokens": "sum of generated tokens",
    "target_calls": "sum of target calls",
    "draft_calls": "sum of draft calls",
    "decode_seconds": "sum of decode seconds",
    "prefill_seconds": "sum of prefill seconds",
    "block_efficiency": "sum(new_tokens) / sum(target_calls)",
    "block_efficiency_example_std": "standard deviation of per-example block efficiency",
    "block_efficiency_se": "standard error of block_efficiency: bootstrap over the examples "
                           "(2000 resamples, seeded) of sum(new_tokens) / sum(target_calls)",
    "mbsu": "metrics.mbsu of the cell's block_efficiency (with draft_params, target_params, L)",
    "token_rate": "sum(new_tokens) / sum(decode_seconds) (tokens/s)",
    "ar_token_rate": "token_rate of the matching AR cell(s) (NaN if none)",
    "token_rate_ratio": "token_rate / ar_token_rate",
    "accuracy": "corpus-level score of the cell (rsd_bench.accuracy.corpus_score), 0-100",
    "ar_accuracy": "accuracy of the matching AR cell(s) (NaN if none)",
    "accuracy_ratio": "accuracy / ar_accuracy (NaN if ar_accuracy is 0 or missing)",
    "example_accuracy_mean": "mean of the per-example (sentence-level) accuracy",
    "example_accuracy_ratio": "example_accuracy_mean / the AR cell's, over the examples both have",
    "example_accuracy_ratio_ci_low": "2.5th percentile of example_accuracy_ratio over a paired "
                                     "bootstrap of the examples (2000 resamples, seeded)",
    "example_accuracy_ratio_ci_high": "97.5th percentile of the same bootstrap; an interval that "
                                      "contains 1 means the accuracy difference is within sampling noise",
    "accept_rate_per_depth": "JSON list: sum(depth_accepts) / sum(depth_attempts) per depth",
    "tokens_per_block_hist": "JSON list: element k = number of blocks (target calls) that produced k tokens",
    "nodes_per_call": "mean nodes verified per target call (per-example means weighted by target_calls)",
    "draft_fraction": "sum(draft_seconds) / sum(decode_seconds)",
    "verify_fraction": "sum(verify_seconds) / sum(decode_seconds)",
    "overhead_fraction": "sum(overhead_seconds) / sum(decode_seconds)",
}

#: File names written by :func:`collect`; :func:`read_results` skips them inside directories.
RESULTS_FILE = "results.parquet"
CELLS_FILE = "cells.parquet"
CELLS_CSV = "cells.csv"
AGGREGATE_FILES: frozenset[str] = frozenset({RESULTS_FILE, CELLS_FILE})

_STR, _INT, _FLOAT = pa.string(), pa.int64(), pa.float64()
_ARROW_TYPES: dict[str, pa.DataType] = {
    **{c: _STR for c in (
        "sweep", "cell_id", "pair", "target_id", "draft_id", "dataset", "method", "branching",
        "setting", "dtype", "device_name", "torch_version", "transformers_version",
        "rsd_bench_version", "git_commit", "accuracy_metric", "example_id", "tokens_per_block",
        "depth_attempts", "depth_accepts", "prediction", "reference")},
    **{c: _INT for c in (
        "L", "K", "width", "seed", "max_new_tokens", "job_num", "target_params", "draft_params",
        "example_index", "prompt_tokens", "new_tokens", "target_calls", "draft_calls")},
    **{c: _FLOAT for c in (
        "temperature", "top_p", "decode_seconds", "prefill_seconds", "draft_seconds",
        "verify_seconds", "overhead_seconds", "nodes_per_call", "block_efficiency", "mbsu",
        "token_rate", "accuracy")},
}
assert set(_ARROW_TYPES) == set(EXAMPLE_COLUMNS)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _clean_value(v):
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def _rows_to_table(rows: list[dict]) -> pa.Table:
    names = list(EXAMPLE_COLUMNS) + sorted({k for r in rows for k in r} - set(EXAMPLE_COLUMNS))
    missing = [c for c in EXAMPLE_COLUMNS if rows and not any(c in r for r in rows)]
    if missing:
        warnings.warn(f"write_rows: rows lack columns {missing}; writing them as null", stacklevel=3)
    arrays, fields = [], []
    for name in names:
        values = [_clean_value(r.get(name)) for r in rows]
        typ = _ARROW_TYPES.get(name)
        if typ is None:
            arr = pa.array(values)
        elif typ == _STR:
            arr = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)
                                                    if isinstance(v, (list, tuple, dict)) else str(v))
                            for v in values], type=typ)
        elif typ == _INT:
            conv = []
            for v in values:
                if v is None:
                    conv.append(None)
                elif isinstance(v, bool) or float(v) != int(v):
                    raise ValueError(f"column {name!r} must hold integers, got {v!r}")
                else:
                    conv.append(int(v))
            arr = pa.array(conv, type=typ)
        else:
            arr = pa.array([None if v is None else float(v) for v in values], type=typ)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_rows(rows: list[dict], path) -> Path:
    """Write per-example rows (dicts keyed by :data:`EXAMPLE_COLUMNS`) to a parquet file, atomically.

    Columns get the fixed types of the schema (so per-job files concatenate cleanly); list
    values of the JSON columns are JSON-encoded; columns missing from all rows are written as
    null (with a warning); extra columns are kept. Parent directories are created. A kill
    during the write leaves either the old file or no file, never a half-written one.
    """
    table = _rows_to_table(list(rows))
    return _atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


def _frame_to_table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df, preserve_index=False)


def _write_parquet_atomic(df: pd.DataFrame, path: Path) -> Path:
    table = _frame_to_table(df)
    return _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> Path:
    return _atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _job_files(directory: Path) -> list[Path]:
    files = []
    for p in sorted(directory.rglob("*.parquet")):
        if p.name in AGGREGATE_FILES or p.name.startswith("."):
            continue
        if any(part.startswith(".") for part in p.relative_to(directory).parts[:-1]):
            continue
        if p.is_file():
            files.append(p)
    return files


def read_results(path_or_dir) -> pd.DataFrame:
    """Read per-example rows: one parquet file, or every per-job ``*.parquet`` under a directory.

    Inside a directory (searched recursively, in sorted path order) the aggregate files
    written by :func:`collect` (``results.parquet``, ``cells.parquet``) and hidden files/dirs
    are skipped, so rows are never counted twice. A file path is read whatever its name.
    Returns an empty frame with the :data:`EXAMPLE_COLUMNS` columns if nothing is found.
    """
    path = Path(path_or_dir)
    if path.is_file():
        return pd.read_parquet(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such results file or directory: {path}")
    frames = [pd.read_parquet(p) for p in _job_files(path)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in EXAMPLE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def completed_cells(path_or_dir) -> set[str]:
    """``cell_id`` values that already have a per-job file (the runner writes a cell's file only
    when the cell is finished). Aggregate files are ignored; unreadable files are skipped with
    a warning (their cells count as not done); a missing directory gives an empty set."""
    path = Path(path_or_dir)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _job_files(path)
    else:
        return set()
    done: set[str] = set()
    for p in files:
        try:
            col = pq.read_table(p, columns=["cell_id"]).column("cell_id").to_pylist()
        except Exception as exc:  # corrupt or foreign file: rerun its cell
            warnings.warn(f"completed_cells: cannot read {p}: {exc}", stacklevel=2)
            continue
        done.update(str(c) for c in col if c is not None)
    return done


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

def _json_list(s) -> list:
    if s is None or (isinstance(s, float) and math.isnan(s)) or s is pd.NA:
        return []
    if isinstance(s, (list, tuple, np.ndarray)):
        return list(s)
    s = str(s).strip()
    if not s:
        return []
    return list(json.loads(s))


def _sum_lists(values: Iterable) -> list[float]:
    total: list[float] = []
    for v in values:
        lst = _json_list(v)
        if len(lst) > len(total):
            total.extend([0.0] * (len(lst) - len(total)))
        for i, x in enumerate(lst):
            if x is not None:
                total[i] += float(x)
    return total


def _block_hist(values: Iterable) -> list[int]:
    hist: list[int] = []
    for v in values:
        for k in _json_list(v):
            k = int(k)
            if k >= len(hist):
                hist.extend([0] * (k + 1 - len(hist)))
            hist[k] += 1
    return hist


def _nan_sum(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce")
    return float(s.sum()) if s.notna().any() else float("nan")


def _ratio(num: float, den: float) -> float:
    if den is None or num is None or math.isnan(den) or math.isnan(num) or den == 0:
        return float("nan")
    return num / den


def _key_value(v):
    """Normalise a value for AR matching (NaN/None/NA equal; 1 == 1.0)."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, float):
        return round(v, 9)
    return v


def _corpus_accuracy(group: pd.DataFrame) -> float:
    metric = group["accuracy_metric"].dropna() if "accuracy_metric" in group else pd.Series([])
    if metric.empty or "prediction" not in group or "reference" not in group:
        return float("nan")
    metric_name = str(metric.iloc[0])
    if not metric_name:
        return float("nan")
    from rsd_bench.accuracy import corpus_score  # lazy: pulls in sacrebleu / rouge-score

    preds = ["" if _key_value(p) is None else str(p) for p in group["prediction"]]
    refs = ["" if _key_value(r) is None else str(r) for r in group["reference"]]
    return float(corpus_score(metric_name, preds, refs))


def _aggregate_cell(g: pd.DataFrame) -> dict:
    out: dict = {}
    for c in CONFIG_COLUMNS:
        if c in g:
            vals = g[c].dropna()
            out[c] = vals.iloc[0] if len(vals) else g[c].iloc[0]
        else:
            out[c] = None
    n = len(g)
    sums = {c: _nan_sum(g[c]) if c in g else float("nan") for c in (
        "prompt_tokens", "new_tokens", "target_calls", "draft_calls", "decode_seconds",
        "prefill_seconds", "draft_seconds", "verify_seconds", "overhead_seconds")}
    be = metrics.block_efficiency(sums["new_tokens"], sums["target_calls"])
    new_tokens = pd.to_numeric(g["new_tokens"], errors="coerce")
    target_calls = pd.to_numeric(g["target_calls"], errors="coerce")
    per_example_be = metrics.block_efficiency(new_tokens, target_calls)
    L = _key_value(out.get("L"))
    dp = _key_value(out.get("draft_params"))
    tp = _key_value(out.get("target_params"))
    if L is None or tp is None:
        cell_mbsu = float("nan")
    else:
        cell_mbsu = metrics.mbsu(be, 0 if dp is None else dp, tp, L)
    rate = metrics.token_rate(sums["new_tokens"], sums["decode_seconds"])

    attempts = _sum_lists(g["depth_attempts"]) if "depth_attempts" in g else []
    accepts = _sum_lists(g["depth_accepts"]) if "depth_accepts" in g else []
    depth = max(len(attempts), len(accepts))
    attempts += [0.0] * (depth - len(attempts))
    accepts += [0.0] * (depth - len(accepts))
    accept_rate = [None if a == 0 else acc / a for a, acc in zip(attempts, accepts)]

    if "nodes_per_call" in g:
        npc = pd.to_numeric(g["nodes_per_call"], errors="coerce")
        calls = pd.to_numeric(g["target_calls"], errors="coerce")
        ok = npc.notna() & calls.notna() & (calls > 0)
        nodes = float((npc[ok] * calls[ok]).sum() / calls[ok].sum()) if ok.any() else float("nan")
    else:
        nodes = float("nan")

    for c in ("prompt_tokens", "new_tokens", "target_calls", "draft_calls"):
        if not math.isnan(sums[c]):
            sums[c] = int(sums[c])
    dec = sums["decode_seconds"]
    out.update({
        "n_examples": n,
        "prompt_tokens": sums["prompt_tokens"],
        "new_tokens": sums["new_tokens"],
        "target_calls": sums["target_calls"],
        "draft_calls": sums["draft_calls"],
        "decode_seconds": dec,
        "prefill_seconds": sums["prefill_seconds"],
        "block_efficiency": be,
        "block_efficiency_example_std": float(per_example_be.std()) if n > 1 else float("nan"),
        "block_efficiency_se": ratio_of_sums_se(new_tokens, target_calls),
        "mbsu": cell_mbsu,
        "token_rate": rate,
        "accuracy": _corpus_accuracy(g),
        "example_accuracy_mean": float(pd.to_numeric(g["accuracy"], errors="coerce").mean())
        if "accuracy" in g else float("nan"),
        "accept_rate_per_depth": json.dumps(accept_rate),
        "tokens_per_block_hist": json.dumps(
            _block_hist(g["tokens_per_block"]) if "tokens_per_block" in g else []),
        "nodes_per_call": nodes,
        "draft_fraction": _ratio(sums["draft_seconds"], dec),
        "verify_fraction": _ratio(sums["verify_seconds"], dec),
        "overhead_fraction": _ratio(sums["overhead_seconds"], dec),
    })
    return out


BOOTSTRAP_RESAMPLES = 2000


def ratio_of_sums_se(num, den, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Bootstrap standard error of sum(num) / sum(den), resampling examples (rows with a NaN are
    dropped). Block efficiency is such a ratio, so comparing two methods' block efficiencies
    takes this, not the per-example spread: their difference over sqrt(se1^2 + se2^2) is a z-score."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    ok = ~(np.isnan(num) | np.isnan(den))
    num, den = num[ok], den[ok]
    n = len(num)
    if n < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    top, bottom = num[idx].sum(1), den[idx].sum(1)
    ratios = np.divide(top, bottom, out=np.full_like(top, np.nan), where=bottom > 0)
    return float(np.nanstd(ratios, ddof=1))


def paired_ratio_ci(values: np.ndarray, baseline: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(ratio of means, low, high): percentile bootstrap of mean(values) / mean(baseline), resampling
    examples in pairs (the same prompts), so prompt-to-prompt spread cancels and what remains is
    the sampling noise of two independent generations per prompt."""
    values, baseline = np.asarray(values, float), np.asarray(baseline, float)
    n = len(values)
    if n == 0 or baseline.mean() <= 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    num, den = values[idx].mean(1), baseline[idx].mean(1)
    ratios = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(ratios, [tail, 100 - tail])
    return float(values.mean() / baseline.mean()), float(low), float(high)


def _example_accuracy(df: pd.DataFrame) -> dict[str, pd.Series]:
    """cell_id -> per-example accuracy indexed by example_id."""
    if "accuracy" not in df or "example_id" not in df:
        return {}
    acc = pd.to_numeric(df["accuracy"], errors="coerce")
    frame = pd.DataFrame({"cell_id": df["cell_id"], "example_id": df["example_id"].astype(str), "acc": acc})
    return {cid: g.set_index("example_id")["acc"].dropna() for cid, g in frame.groupby("cell_id", sort=False)}


def _attach_ar_baseline(cells: pd.DataFrame, examples: dict[str, pd.Series] | None = None) -> pd.DataFrame:
    """Fill ar_token_rate / ar_accuracy and the ratios from the matching AR cells.

    The AR baseline of a cell is every ``method == 'ar'`` cell with the same values in
    :data:`AR_MATCH_COLUMNS` (falling back to the same ``target_id`` instead of ``pair`` when no
    AR cell carries the cell's pair label). If several match, those of the same ``sweep`` are
    preferred; the rest are pooled (token rate = summed tokens / summed seconds, accuracy = mean
    of their corpus scores).
    """
    cells = cells.copy()
    is_ar = cells["method"].astype(str) == "ar"
    ar = cells[is_ar]

    def key(row, first: str):
        cols = [first] + AR_MATCH_COLUMNS[1:]
        return tuple(_key_value(row.get(c)) for c in cols)

    by_pair: dict[tuple, list[int]] = {}
    by_target: dict[tuple, list[int]] = {}
    for idx, row in ar.iterrows():
        by_pair.setdefault(key(row, "pair"), []).append(idx)
        by_target.setdefault(key(row, "target_id"), []).append(idx)

    examples = examples or {}
    nan3 = (float("nan"),) * 3
    ar_rate, ar_acc, ex_ratio = [], [], []
    for _, row in cells.iterrows():
        match = by_pair.get(key(row, "pair")) or by_target.get(key(row, "target_id")) or []
        same_sweep = [i for i in match if _key_value(ar.at[i, "sweep"]) == _key_value(row.get("sweep"))]
        match = same_sweep or match
        if not match:
            ar_rate.append(float("nan"))
            ar_acc.append(float("nan"))
            ex_ratio.append(nan3)
            continue
        m = ar.loc[match]
        ar_rate.append(metrics.token_rate(_nan_sum(m["new_tokens"]), _nan_sum(m["decode_seconds"])))
        accs = pd.to_numeric(m["accuracy"], errors="coerce")
        ar_acc.append(float(accs.mean()) if accs.notna().any() else float("nan"))
        # per-example AR accuracy (several matching AR cells: mean per example), paired by example
        ar_ex = [examples[c] for c in m["cell_id"] if c in examples]
        mine = examples.get(row["cell_id"])
        if mine is None or not ar_ex:
            ex_ratio.append(nan3)
            continue
        base = pd.concat(ar_ex).groupby(level=0).mean()
        common = mine.index.intersection(base.index)
        ex_ratio.append(paired_ratio_ci(mine.loc[common].to_numpy(), base.loc[common].to_numpy()))

    cells["ar_token_rate"] = ar_rate
    cells["ar_accuracy"] = ar_acc
    cells["token_rate_ratio"] = [_ratio(a, b) for a, b in zip(cells["token_rate"], cells["ar_token_rate"])]
    cells["accuracy_ratio"] = [_ratio(a, b) for a, b in zip(cells["accuracy"], cells["ar_accuracy"])]
    for i, col in enumerate(("example_accuracy_ratio", "example_accuracy_ratio_ci_low",
                             "example_accuracy_ratio_ci_high")):
        cells[col] = [r[i] for r in ex_ratio]
    return cells


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (``cell_id``) with the config columns and the metrics of :data:`CELL_COLUMNS`.

    Ratios: see :func:`_attach_ar_baseline` for how the AR cell of a cell is found. Accuracy is
    the corpus score of the cell's predictions against its references with its
    ``accuracy_metric`` (``rsd_bench.accuracy.corpus_score``). Duplicate (cell_id, example_id)
    rows (the same cell written twice) are dropped, keeping the last, with a warning. Cells keep
    the order of their first appearance in ``df``.
    """
    columns = CONFIG_COLUMNS + list(CELL_COLUMNS)
    if df is None or len(df) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    if "cell_id" not in df:
        raise ValueError("aggregate needs a 'cell_id' column")
    if "example_id" in df:
        dup = df.duplicated(subset=["cell_id", "example_id"], keep="last")
        if dup.any():
            warnings.warn(f"aggregate: dropping {int(dup.sum())} duplicate (cell_id, example_id) rows",
                          stacklevel=2)
            df = df[~dup]
    records = [_aggregate_cell(g) for _, g in df.groupby("cell_id", sort=False, dropna=False)]
    cells = pd.DataFrame.from_records(records)
    cells = _attach_ar_baseline(cells, _example_accuracy(df))
    for c in CONFIG_COLUMNS:  # keep string config columns strings even when all null
        if _ARROW_TYPES[c] == _STR and cells[c].isna().all():
            cells[c] = cells[c].astype(object).astype("str")
    return cells[columns]


def collect(sweep_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every per-job file under ``sweep_dir``, write ``results.parquet`` (all rows),
    ``cells.parquet`` and ``cells.csv`` (per-cell aggregate) into ``sweep_dir`` atomically,
    and return ``(rows, cells)``."""
    sweep_dir = Path(sweep_dir)
    rows = read_results(sweep_dir)
    cells = aggregate(rows)
    _write_parquet_atomic(rows, sweep_dir / RESULTS_FILE)
    _write_parquet_atomic(cells, sweep_dir / CELLS_FILE)
    _write_csv_atomic(cells, sweep_dir / CELLS_CSV)
    return rows, cells


def select_best(cells: pd.DataFrame, criterion: str = "block_efficiency",
                by: tuple[str, ...] = ("pair", "dataset", "method", "L")) -> pd.DataFrame:
    """For each ``by`` group (default (pair, dataset, method, L)) keep the cell (setting) with the
    highest ``criterion``; groups whose criterion is all NaN keep their first cell. Only for
    plotting: the input is not modified. Rows keep their original order."""
    if len(cells) == 0:
        return cells.copy()
    if criterion not in cells:
        raise KeyError(f"criterion column {criterion!r} not in cells")
    crit = pd.to_numeric(cells[criterion], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    best: dict[tuple, int] = {}  # group key -> position of the best row so far
    for pos, key in enumerate(zip(*(cells[b].tolist() for b in by))):
        key = tuple(_key_value(v) for v in key)
        cur = best.get(key)
        if cur is None or (not math.isnan(crit[pos]) and (math.isnan(crit[cur]) or crit[pos] > crit[cur])):
            best[key] = pos
    return cells.iloc[sorted(best.values())]
