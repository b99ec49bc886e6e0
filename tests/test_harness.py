"""The harness end to end: presets compose, a mini sweep writes the documented parquet and plot,
a rerun skips finished cells, and bad input stops early with a message that says what to fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rsd_bench.config import register_configs
from rsd_bench.results import EXAMPLE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(hydra_conf, experiment):
    cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.experiment == experiment
    assert cfg.hydra.sweeper.params  # each preset is a sweep


@pytest.mark.parametrize("group", ["pair", "dataset", "method"])
def test_every_group_option_composes(hydra_conf, group):
    for option in options(group):
        cfg = compose("config", overrides=[f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)  # everything resolves
        if group == "method":
            from rsd_bench.methods import get_method
            from rsd_bench.runner import method_grid

            assert method_grid(get_method(cfg.method.name), cfg.method)


@pytest.mark.parametrize("override", ["method.KK=3", "dataset.num_exampels=2", "pair.traget=x", "Ll=3"])
def test_typo_fails_at_composition(hydra_conf, override):
    with pytest.raises(Exception) as err:
        compose("config", overrides=[override])
    assert override.split("=")[0].split(".")[-1] in str(err.value)


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rsd_bench.cli", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


MINI = ["-m", "experiment=smoke", "pair=random_tiny", "dataset=wmt,dolly", "method=ar,rsd_s",
        "L=[2,3]", "dataset.num_examples=2", "dataset.max_new_tokens=12", "warmup_tokens=2"]


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "mini"
    proc = run_cli(*MINI, f"results_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_mini_sweep_writes_documented_schema(mini_sweep):
    out, proc = mini_sweep
    rows = pd.read_parquet(out / "results.parquet")
    assert list(rows.columns) == list(EXAMPLE_COLUMNS)
    # 2 datasets x (ar + rsd_s at L=2,3) x 2 examples
    assert len(rows) == 2 * 3 * 2
    assert set(rows["method"]) == {"ar", "rsd_s"} and set(rows["L"]) == {0, 2, 3}
    assert (rows["new_tokens"] == rows["tokens_per_block"].map(lambda s: sum(eval(s)))).all()
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 6
    rsd = cells[cells.method == "rsd_s"]
    assert rsd["token_rate_ratio"].notna().all() and cells["accuracy"].notna().all()
    assert "block_efficiency" in proc.stdout  # the summary table


def test_mini_sweep_plot_has_rows_times_four_panels(mini_sweep):
    from rsd_bench.plot import build_grid_figure

    out, _ = mini_sweep
    assert (out / "grid.png").stat().st_size > 0 and (out / "grid.pdf").stat().st_size > 0
    fig = build_grid_figure(pd.read_parquet(out / "cells.parquet"))
    assert len([ax for ax in fig.axes if ax.has_data()]) == 2 * 4


def test_rerun_skips_completed_cells(mini_sweep):
    out, _ = mini_sweep
    files = sorted((out / "cells").glob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in files}
    proc = run_cli(*MINI, f"results_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in sorted((out / "cells").glob("*.parquet"))} == before
    assert "already complete" in proc.stderr + proc.stdout


def test_baseline_only_run_collects_without_a_grid(tmp_path):
    proc = run_cli("experiment=smoke", "pair=random_tiny", "method=ar", "hydra.mode=RUN",
                   "dataset.num_examples=1", "dataset.max_new_tokens=4", f"results_dir={tmp_path}/r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no grid: only AR cells" in proc.stdout
    assert "raised" not in proc.stderr  # the collect-and-plot callback did not fail
    assert (tmp_path / "r" / "cells.csv").exists() and not (tmp_path / "r" / "grid.png").exists()


def test_missing_dataset_file_says_how_to_fix(tmp_path):
    proc = run_cli("experiment=smoke", "pair=random_tiny", "method=ar", "hydra.mode=RUN",
                   "dataset=xsum", f"dataset.path={tmp_path}/nope.jsonl", f"results_dir={tmp_path}/r")
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "dataset.path" in proc.stderr


def test_prompt_longer_than_context_stops_early(tmp_path):
    proc = run_cli("experiment=smoke", "hydra.mode=RUN", "method=ar", "pair=random_tiny",
                   "pair.target=random-llama:context-64", "dataset.max_new_tokens=40",
                   f"results_dir={tmp_path}/r")
    assert proc.returncode != 0
    assert "exceeds the model context" in proc.stderr
    assert not list((tmp_path / "r").glob("cells/*.parquet"))


def test_tokenizer_mismatch_is_refused():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from rsd_bench.pair import TokenizerMismatchError, check_same_tokenizer
    from rsd_bench.tiny_models import byte_tokenizer

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    check_same_tokenizer(byte_tokenizer(), byte_tokenizer(), "t", "d")
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer"):
        check_same_tokenizer(byte_tokenizer(), other, "t", "d")


def test_unknown_method_parameter_is_refused(hydra_conf):
    from rsd_bench.methods import get_method
    from rsd_bench.runner import method_grid

    cfg = compose("config", overrides=["method=sd", "method.K=3"])
    with pytest.raises(ValueError, match="has no parameter"):
        method_grid(get_method("sd"), cfg.method)
