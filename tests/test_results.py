import hashlib
import importlib
import json
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsd_bench import results as R
from rsd_bench.results import (
    CELL_COLUMNS,
    CONFIG_COLUMNS,
    EXAMPLE_COLUMNS,
    aggregate,
    collect,
    completed_cells,
    read_results,
    select_best,
    write_rows,
)

PAIRS = {  # pair -> (target_id, draft_id, target_params, draft_params, seconds per AR example)
    "llama2-7b/68m": ("meta-llama/Llama-2-7b-hf", "JackFram/llama-68m", 7_000_000_000, 68_000_000, 1.0),
    "llama2-13b/160m": ("meta-llama/Llama-2-13b-hf", "JackFram/llama-160m", 13_000_000_000, 160_000_000, 2.0),
}
DATASETS = {"xsum": "rouge2", "dolly": "rougeL"}
# (method, L, setting) -> base tokens per example (target_calls = 10 per non-AR example)
BASE = {
    ("sd", 2, ""): 18,
    ("sd", 3, ""): 20,
    ("rsd_s", 2, "W=2"): 22,
    ("rsd_s", 3, "W=2"): 30,
    ("rsd_s", 2, "W=4"): 25,
    ("rsd_s", 3, "W=4"): 27,
}
N_EX = 3
REFS = ["the cat sat on the mat today", "a dog ran in the park quickly", "birds sing loudly in the morning"]
# examples predicted exactly (others predict ''): corpus ROUGE = 100 * share of exact predictions
EXACT = {"ar": {0, 1, 2}, "sd": {0}, "rsd_s": {0, 1}}


@pytest.fixture(autouse=True)
def accuracy_module(monkeypatch):
    """Use the real rsd_bench.accuracy; insert a fake one only if it is missing."""
    try:
        importlib.import_module("rsd_bench.accuracy")
    except ImportError:
        fake = types.ModuleType("rsd_bench.accuracy")

        def corpus_score(metric, predictions, references):
            assert metric in ("bleu", "rouge2", "rougeL")
            return 100.0 * sum(p == r for p, r in zip(predictions, references)) / len(predictions)

        fake.corpus_score = corpus_score
        monkeypatch.setitem(sys.modules, "rsd_bench.accuracy", fake)


def cell_id(*parts):
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def make_cell(pair, dataset, method, L, setting, sweep="fixed_length"):
    target_id, draft_id, tp, dp, ar_secs = PAIRS[pair]
    cid = cell_id(sweep, pair, dataset, method, L, setting)
    rows = []
    for i in range(N_EX):
        if method == "ar":
            new, calls, secs = 10 + i, 10 + i, ar_secs
            tpb = [1] * calls
            attempts, accepts, nodes, draft_calls = [], [], 1.0, 0
            dsec, vsec, osec = 0.0, 0.9 * secs, 0.1 * secs
        else:
            new, calls, secs = BASE[(method, L, setting)] + i, 10, ar_secs / 2
            q, r = divmod(new, calls)
            tpb = [q + 1] * r + [q] * (calls - r)
            attempts = [10] + [6] * (L - 1)
            accepts = [6] + [3] * (L - 1)
            nodes = float(L * (int(setting[2:]) if setting else 1))
            draft_calls = calls * L
            dsec, vsec, osec = 0.2 * secs, 0.6 * secs, 0.2 * secs
        exact = i in EXACT[method]
        rows.append(dict(
            sweep=sweep, cell_id=cid, pair=pair, target_id=target_id,
            draft_id=None if method == "ar" else draft_id, dataset=dataset, method=method, L=L,
            K=None, branching=None, width=int(setting[2:]) if setting.startswith("W=") else None,
            setting=setting, temperature=1.0, top_p=None, seed=0, dtype="bfloat16",
            device_name="NVIDIA H100 80GB HBM3", max_new_tokens=64, target_params=tp,
            draft_params=0 if method == "ar" else dp, torch_version="2.5.0",
            transformers_version="5.0.0", rsd_bench_version="0.1.0", git_commit="abc123",
            accuracy_metric=DATASETS[dataset], example_id=f"{dataset}-{i}", example_index=i,
            prompt_tokens=50 + i, new_tokens=new, target_calls=calls, draft_calls=draft_calls,
            decode_seconds=secs, prefill_seconds=0.05, draft_seconds=dsec, verify_seconds=vsec,
            overhead_seconds=osec, tokens_per_block=json.dumps(tpb),
            depth_attempts=json.dumps(attempts), depth_accepts=json.dumps(accepts),
            nodes_per_call=nodes, block_efficiency=new / calls,
            mbsu=(new / calls) / (1 + (0 if method == "ar" else dp / tp) * L),
            token_rate=new / secs, accuracy=100.0 if exact else 0.0,
            prediction=REFS[i] if exact else "", reference=REFS[i], job_num=0,
        ))
    return rows


def all_cells():
    cells = []
    for pair in PAIRS:
        for ds in DATASETS:
            cells.append(make_cell(pair, ds, "ar", 0, ""))
            for (m, L, s) in BASE:
                cells.append(make_cell(pair, ds, m, L, s))
    return cells


def write_sweep(root: Path):
    for rows in all_cells():
        r0 = rows[0]
        write_rows(rows, root / r0["pair"].replace("/", "_") / r0["dataset"] / f"{r0['cell_id']}.parquet")


def find(cells, **kw):
    m = pd.Series(True, index=cells.index)
    for k, v in kw.items():
        m &= cells[k] == v
    sub = cells[m]
    assert len(sub) == 1, (kw, len(sub))
    return sub.iloc[0]


# ------------------------------------------------------------------------------------------


def test_schema_constants():
    assert CONFIG_COLUMNS[0] == "sweep" and CONFIG_COLUMNS[-1] == "accuracy_metric"
    assert "example_id" not in CONFIG_COLUMNS
    for c in ("cell_id", "L", "tokens_per_block", "decode_seconds", "prediction", "reference"):
        assert c in EXAMPLE_COLUMNS
    assert all(isinstance(v, str) and v for v in EXAMPLE_COLUMNS.values())
    rows = make_cell("llama2-7b/68m", "xsum", "sd", 2, "")
    assert set(rows[0]) == set(EXAMPLE_COLUMNS)


def test_collect_aggregates_by_hand(tmp_path):
    write_sweep(tmp_path)
    rows, cells = collect(tmp_path)
    n_cells = len(PAIRS) * len(DATASETS) * (1 + len(BASE))
    assert len(rows) == n_cells * N_EX
    assert len(cells) == n_cells
    assert list(cells.columns) == CONFIG_COLUMNS + list(CELL_COLUMNS)
    for name in ("results.parquet", "cells.parquet", "cells.csv"):
        assert (tmp_path / name).stat().st_size > 0

    # sd, L=2 on llama2-7b/xsum: tokens 18+19+20 = 57 over 3*10 calls
    sd = find(cells, pair="llama2-7b/68m", dataset="xsum", method="sd", L=2)
    assert sd["n_examples"] == 3
    assert sd["new_tokens"] == 57 and sd["target_calls"] == 30
    assert sd["block_efficiency"] == pytest.approx(1.9)
    assert sd["mbsu"] == pytest.approx(1.9 / (1 + 68e6 / 7e9 * 2))
    # decode 3 * 0.5 s; AR: (10+11+12) tokens / 3 s = 11 tok/s
    assert sd["token_rate"] == pytest.approx(57 / 1.5)
    assert sd["ar_token_rate"] == pytest.approx(11.0)
    assert sd["token_rate_ratio"] == pytest.approx(57 / 1.5 / 11)
    # accuracy: AR predicts all 3 exactly (100), sd only example 0 (100/3)
    assert sd["accuracy"] == pytest.approx(100 / 3)
    assert sd["ar_accuracy"] == pytest.approx(100.0)
    assert sd["accuracy_ratio"] == pytest.approx(1 / 3)
    assert sd["example_accuracy_mean"] == pytest.approx(100 / 3)
    # paired by example: per-example scores (100, 0, 0) against AR's (100, 100, 100)
    assert sd["example_accuracy_ratio"] == pytest.approx(1 / 3)
    assert 0 <= sd["example_accuracy_ratio_ci_low"] <= 1 / 3 <= sd["example_accuracy_ratio_ci_high"] <= 1
    # acceptance per depth: attempts [30, 18], accepts [18, 9]
    assert json.loads(sd["accept_rate_per_depth"]) == pytest.approx([0.6, 0.5])
    # block histogram: 18 tokens / 10 calls -> 8 x 2 + 2 x 1; 19 -> 9 x 2 + 1 x 1; 20 -> 10 x 2
    assert json.loads(sd["tokens_per_block_hist"]) == [0, 3, 27]
    assert sd["nodes_per_call"] == pytest.approx(2.0)
    assert sd["draft_fraction"] == pytest.approx(0.2)
    assert sd["verify_fraction"] == pytest.approx(0.6)
    assert sd["overhead_fraction"] == pytest.approx(0.2)

    # rsd_s W=4, L=3 on the 13B pair / dolly: tokens 27+28+29 = 84, calls 30; AR 33 tok / 6 s
    rs = find(cells, pair="llama2-13b/160m", dataset="dolly", method="rsd_s", L=3, setting="W=4")
    assert rs["block_efficiency"] == pytest.approx(84 / 30)
    assert rs["mbsu"] == pytest.approx(2.8 / (1 + 160e6 / 13e9 * 3))
    assert rs["token_rate"] == pytest.approx(84 / 3.0)
    assert rs["token_rate_ratio"] == pytest.approx((84 / 3.0) / (33 / 6.0))
    assert rs["accuracy_ratio"] == pytest.approx(2 / 3)
    assert json.loads(rs["accept_rate_per_depth"]) == pytest.approx([0.6, 0.5, 0.5])
    assert rs["nodes_per_call"] == pytest.approx(12.0)

    # AR cells: block efficiency 1, MBSU 1, ratios 1
    ar = cells[cells["method"] == "ar"]
    assert len(ar) == 4
    for col in ("block_efficiency", "mbsu", "token_rate_ratio", "accuracy_ratio", "example_accuracy_ratio",
                "example_accuracy_ratio_ci_low", "example_accuracy_ratio_ci_high"):
        assert ar[col].tolist() == pytest.approx([1.0] * 4)
    assert json.loads(ar.iloc[0]["accept_rate_per_depth"]) == []

    # every cell: block efficiency = sum / sum, computed independently from the rows
    for _, c in cells.iterrows():
        sub = rows[rows["cell_id"] == c["cell_id"]]
        assert c["block_efficiency"] == pytest.approx(sub["new_tokens"].sum() / sub["target_calls"].sum())
        hist = Counter(k for s in sub["tokens_per_block"] for k in json.loads(s))
        assert sum(json.loads(c["tokens_per_block_hist"])) == sum(hist.values())

    # the written aggregate files hold the same table
    on_disk = pd.read_parquet(tmp_path / "cells.parquet")
    assert len(on_disk) == n_cells
    assert on_disk["block_efficiency"].tolist() == pytest.approx(cells["block_efficiency"].tolist())
    csv = pd.read_csv(tmp_path / "cells.csv")
    assert csv["token_rate_ratio"].tolist() == pytest.approx(cells["token_rate_ratio"].tolist())


def test_collect_twice_no_double_counting(tmp_path):
    write_sweep(tmp_path)
    rows1, cells1 = collect(tmp_path)
    rows2, cells2 = collect(tmp_path)  # results.parquet / cells.parquet now exist in the dir
    assert len(rows2) == len(rows1)
    assert cells2["new_tokens"].tolist() == cells1["new_tokens"].tolist()
    # an aggregate file name deeper in the tree is skipped too
    (tmp_path / "sub").mkdir()
    rows1.to_parquet(tmp_path / "sub" / "results.parquet")
    assert len(read_results(tmp_path)) == len(rows1)
    # but a file path given explicitly is read whatever its name
    assert len(read_results(tmp_path / "results.parquet")) == len(rows1)


def test_read_results_empty_and_missing(tmp_path):
    assert len(read_results(tmp_path)) == 0
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "nope")
    assert len(aggregate(read_results(tmp_path))) == 0


def test_select_best_picks_setting(tmp_path):
    write_sweep(tmp_path)
    _, cells = collect(tmp_path)
    best = select_best(cells)
    # one row per (pair, dataset, method, L): ar (L=0), sd L2/L3, rsd_s L2/L3
    assert len(best) == len(PAIRS) * len(DATASETS) * 5
    assert len(cells) == len(PAIRS) * len(DATASETS) * 7  # input untouched
    for pair in PAIRS:
        for ds in DATASETS:
            b = best[(best["pair"] == pair) & (best["dataset"] == ds) & (best["method"] == "rsd_s")]
            assert dict(zip(b["L"], b["setting"])) == {2: "W=4", 3: "W=2"}
    # another criterion: with accuracy all settings tie -> first kept, no crash
    assert len(select_best(cells, criterion="accuracy")) == len(best)
    with pytest.raises(KeyError):
        select_best(cells, criterion="nope")


def test_ratios_nan_without_ar_and_target_fallback(tmp_path):
    rows = make_cell("llama2-7b/68m", "xsum", "sd", 2, "")
    cells = aggregate(pd.DataFrame(rows))
    assert math.isnan(cells.iloc[0]["token_rate_ratio"])
    assert math.isnan(cells.iloc[0]["accuracy_ratio"])
    # AR recorded under a different pair label but the same target: matched by target_id
    ar = make_cell("llama2-7b/68m", "xsum", "ar", 0, "")
    for r in ar:
        r["pair"] = "llama2-7b"
        r["cell_id"] = "ar-cell"
    cells = aggregate(pd.DataFrame(rows + ar))
    sd = cells[cells["method"] == "sd"].iloc[0]
    assert sd["token_rate_ratio"] == pytest.approx(57 / 1.5 / 11)
    # AR accuracy 0 -> ratio NaN
    for r in ar:
        r["prediction"] = ""
    cells = aggregate(pd.DataFrame(rows + ar))
    assert math.isnan(cells[cells["method"] == "sd"].iloc[0]["accuracy_ratio"])


def test_ar_match_respects_device_and_temperature():
    sd = make_cell("llama2-7b/68m", "xsum", "sd", 2, "")
    ar = make_cell("llama2-7b/68m", "xsum", "ar", 0, "")
    for r in ar:
        r["device_name"] = "NVIDIA A100"
    cells = aggregate(pd.DataFrame(sd + ar))
    assert math.isnan(cells[cells["method"] == "sd"].iloc[0]["token_rate_ratio"])
    ar2 = make_cell("llama2-7b/68m", "xsum", "ar", 0, "")
    for r in ar2:
        r["temperature"] = 0.5
    cells = aggregate(pd.DataFrame(sd + ar2))
    assert math.isnan(cells[cells["method"] == "sd"].iloc[0]["token_rate_ratio"])


def test_completed_cells(tmp_path):
    assert completed_cells(tmp_path / "missing") == set()
    assert completed_cells(tmp_path) == set()
    write_sweep(tmp_path)
    expected = {rows[0]["cell_id"] for rows in all_cells()}
    assert completed_cells(tmp_path) == expected
    collect(tmp_path)
    assert completed_cells(tmp_path) == expected
    # a corrupt per-job file is skipped with a warning (its cell reruns)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning):
        assert completed_cells(tmp_path) == expected


def test_write_rows_atomic_leaves_no_temp(tmp_path, monkeypatch):
    rows = make_cell("llama2-7b/68m", "xsum", "sd", 2, "")
    target = tmp_path / "a" / "b" / "job.parquet"
    out = write_rows(rows, target)
    assert out == target and target.is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.parquet"]
    back = pd.read_parquet(target)
    assert len(back) == N_EX
    assert back["K"].isna().all() and back["L"].tolist() == [2, 2, 2]
    before = target.read_bytes()

    # a write that dies half way leaves the old file intact and no temp file behind
    def boom(table, where, *a, **k):
        Path(where).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(R.pq, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        write_rows(make_cell("llama2-7b/68m", "xsum", "sd", 3, ""), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.parquet"]


def test_write_rows_types_and_lists(tmp_path):
    rows = make_cell("llama2-7b/68m", "xsum", "rsd_s", 2, "W=2")
    rows[0]["tokens_per_block"] = [3, 2, 1]  # lists are JSON-encoded
    rows[0]["extra_col"] = "x"  # extra columns are kept
    write_rows(rows, tmp_path / "j.parquet")
    back = pd.read_parquet(tmp_path / "j.parquet")
    assert back.loc[0, "tokens_per_block"] == "[3, 2, 1]"
    assert "extra_col" in back
    with pytest.raises(ValueError):
        write_rows([dict(rows[1], L=2.5)], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()
    # a sd file (width all null) and an rsd_s file (width int) concatenate cleanly
    write_rows(make_cell("llama2-7b/68m", "xsum", "sd", 2, ""), tmp_path / "k.parquet")
    df = read_results(tmp_path)
    assert sorted(df["width"].dropna().unique().tolist()) == [2]


def test_duplicate_rows_dropped_with_warning():
    rows = make_cell("llama2-7b/68m", "xsum", "sd", 2, "")
    with pytest.warns(UserWarning):
        cells = aggregate(pd.DataFrame(rows + rows))
    assert cells.iloc[0]["n_examples"] == N_EX


def test_paired_ratio_ci_covers_and_separates():
    """The bootstrap interval behaves like a 95 % interval: over TRIALS pairs of cells drawn from the
    same distribution it contains 1 in about 95 % of them (percentile bootstrap at n = 50 runs a
    little under; the bound 0.85 is 0.95 minus ~6.5 binomial standard deviations at TRIALS = 200),
    and when the method's mean is 40 % lower it excludes 1 nearly always."""
    from rsd_bench.results import paired_ratio_ci

    rng = np.random.default_rng(1)
    TRIALS, N = 200, 50
    covered = separated = 0
    for t in range(TRIALS):
        prompt = rng.gamma(2.0, 10.0, N)  # prompt difficulty, shared by both generations
        ar = rng.poisson(prompt).astype(float)
        same = rng.poisson(prompt).astype(float)
        worse = rng.poisson(0.6 * prompt).astype(float)
        _, lo, hi = paired_ratio_ci(same, ar, resamples=1000, seed=t)
        covered += lo <= 1.0 <= hi
        _, lo, hi = paired_ratio_ci(worse, ar, resamples=1000, seed=t)
        separated += hi < 1.0
    assert covered / TRIALS >= 0.85, covered
    assert separated / TRIALS >= 0.95, separated
    ratio, lo, hi = paired_ratio_ci(np.ones(5), np.ones(5))
    assert (ratio, lo, hi) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in paired_ratio_ci(np.ones(3), np.zeros(3)))
