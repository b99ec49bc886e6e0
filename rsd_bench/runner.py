"""One Hydra job: a (pair, dataset, method) over draft lengths x the method's settings grid.

Each cell (one setting at one L) writes its own parquet file atomically when it finishes, named
by a hash of its configuration, so a rerun skips finished cells and a crash or kill loses at
most the cell in flight.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from . import __version__
from .accuracy import sentence_score
from .datasets import DatasetConfig, build_prompt, load_examples
from .engine import PromptTooLongError
from .methods import Method, get_method
from .metrics import block_efficiency, mbsu, token_rate

log = logging.getLogger(__name__)

METHOD_FIELDS = ("K", "W", "width", "branching_rule", "branching")


@dataclass
class Cell:
    id: str
    L: int
    params: dict
    settings: dict
    label: str


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def method_grid(method: Method, method_cfg, grid_limit: int | None = None,
                overrides: dict | None = None) -> list[dict]:
    """Parameter dicts to run: a list value sweeps that parameter (branching: a list of lists).

    overrides (the run config's `grids[method]`) replace the method config's values.
    """
    given = {k: _plain(method_cfg.get(k)) for k in METHOD_FIELDS}
    given.update({k: _plain(v) for k, v in (method_cfg.get("params") or {}).items()})
    given.update({k: _plain(v) for k, v in (overrides or {}).items()})
    foreign = sorted(k for k, v in given.items() if v is not None and k not in method.params)
    if foreign:
        raise ValueError(f"method {method.name!r} has no parameter(s) {foreign}; its parameters: "
                         f"{sorted(method.params) or 'none'}. Remove them from the method config.")
    axes = {}
    for key in method.params:
        value = given.get(key)
        if value is None:
            continue
        single_list = key == "branching" and isinstance(value, list) and all(isinstance(v, int) for v in value)
        values = value if isinstance(value, list) and not single_list else [value]
        axes[key] = values[:grid_limit] if grid_limit else values
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())] or [{}]


def cell_id(payload: dict) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_cells(cfg, method: Method, device_name: str) -> list[Cell]:
    lengths = _plain(cfg.L)
    lengths = [0] if not method.uses_draft else (lengths if isinstance(lengths, list) else [lengths])
    base = {
        "pair": _plain(cfg.pair), "dataset": _plain(cfg.dataset), "method": method.name,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "device": device_name,
    }
    base["pair"].pop("note", None)
    cells = []
    for L in lengths:
        overrides = (cfg.get("grids") or {}).get(method.name)
        for params in method_grid(method, cfg.method, cfg.grid_limit, overrides):
            try:
                settings = method.settings(int(L), **params)
            except ValueError as err:
                log.warning("skipping %s L=%s %s: %s", method.name, L, params, err)
                continue
            cells.append(Cell(id=cell_id({**base, "settings": settings}), L=settings["L"],
                              params=params, settings=settings, label=method.setting_label(settings)))
    return cells


def git_commit() -> str:
    if os.environ.get("RSD_BENCH_GIT_COMMIT"):  # copies of the tree without .git (GPU machines)
        return os.environ["RSD_BENCH_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def check_prompts_fit(prompts: list[list[int]], examples, context: int | None, max_new: int, depth: int):
    if context is None:
        return
    for ids, ex in zip(prompts, examples):
        if len(ids) + max_new + depth > context:
            raise PromptTooLongError(
                f"example {ex.id}: prompt of {len(ids)} tokens + max_new_tokens {max_new} + draft "
                f"length {depth} exceeds the model context of {context}. Lower dataset.max_new_tokens, "
                "choose shorter examples (dataset.offset / num_examples) or a shorter prompt template.")


def run_job(cfg, job_num: int = 0) -> Path | None:
    """Run every unfinished cell of this job; return the directory holding the cell files."""
    from .pair import load_pair, resolve_device
    from .results import completed_cells, write_rows

    method = get_method(cfg.method.name)
    pair_cfg = cfg.pair
    dataset_cfg = DatasetConfig(**_plain(cfg.dataset))
    if pair_cfg.datasets and dataset_cfg.name not in pair_cfg.datasets:
        log.info("pair %s is not evaluated on %s (pair.datasets=%s): nothing to do",
                 pair_cfg.name, dataset_cfg.name, list(pair_cfg.datasets))
        return None
    device = resolve_device(cfg.device)
    dev_name = device_name(device)
    cells = plan_cells(cfg, method, dev_name)
    out_dir = Path(cfg.results_dir) / "cells"
    done = completed_cells(out_dir)
    todo = [c for c in cells if c.id not in done]
    if not todo:
        log.info("all %d cells of %s/%s/%s are already complete", len(cells), pair_cfg.name,
                 dataset_cfg.name, method.name)
        return out_dir
    examples = load_examples(dataset_cfg)
    pair = load_pair(pair_cfg.target, pair_cfg.draft if method.uses_draft else None,
                     dtype=pair_cfg.dtype, device=cfg.device, name=pair_cfg.name,
                     attn_implementation=pair_cfg.attn_implementation,
                     fast=_fast_flag(pair_cfg.fast), max_context=pair_cfg.max_context,
                     compile=pair_cfg.compile)
    # capture the fast mode's CUDA graphs now, outside any timed region
    pair.prepare(max(method.max_nodes(c.settings) if method.max_nodes else 64 for c in todo))
    if method.uses_draft and pair.draft is None:
        raise ValueError(f"pair {pair_cfg.name!r} has no draft; method {method.name!r} needs one (set pair.draft)")
    prompts = [build_prompt(ex, dataset_cfg, pair.tokenizer, pair_cfg.chat) for ex in examples]
    check_prompts_fit(prompts, examples, pair.context_length, dataset_cfg.max_new_tokens,
                      max(c.L for c in todo))
    common = {
        "sweep": cfg.experiment, "pair": pair_cfg.name, "target_id": pair_cfg.target,
        "draft_id": pair_cfg.draft if method.uses_draft else None, "dataset": dataset_cfg.name,
        "method": method.name, "temperature": float(cfg.temperature), "top_p": cfg.top_p,
        "seed": int(cfg.seed), "dtype": str(pair.dtype).replace("torch.", ""), "device_name": dev_name,
        "max_new_tokens": dataset_cfg.max_new_tokens, "target_params": pair.target_params,
        "draft_params": pair.draft_params if method.uses_draft else 0,
        "torch_version": torch.__version__, "transformers_version": _transformers_version(),
        "rsd_bench_version": __version__, "git_commit": git_commit(),
        "accuracy_metric": dataset_cfg.metric, "job_num": job_num,
    }
    gen_kwargs = dict(temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.warmup_tokens > 0:  # kernels, allocator and caches warm before anything is timed
        first = todo[0]
        pair.generate(prompts[0], method.name, first.L, max_new_tokens=cfg.warmup_tokens,
                      seed=cfg.seed, **gen_kwargs, **first.params)
    for cell in tqdm(todo, desc=f"{pair_cfg.name}/{dataset_cfg.name}/{method.name} cells", unit="cell"):
        rows = []
        label = f"L={cell.L} {cell.label}".strip()
        for index, (ex, ids) in enumerate(tqdm(list(zip(examples, prompts)), desc=label, leave=False,
                                               unit="ex")):
            res = pair.generate(ids, method.name, cell.L, max_new_tokens=dataset_cfg.max_new_tokens,
                                seed=cfg.seed + index, **gen_kwargs, **cell.params)
            rows.append(_row(common, cell, pair, ex, index, ids, res, dataset_cfg.metric))
        write_rows(rows, out_dir / f"{cell.id}.parquet")
    return out_dir


def _row(common, cell: Cell, pair, ex, index, ids, res, metric) -> dict:
    prediction = pair.decode(res.tokens).strip()
    s = cell.settings
    be = block_efficiency(res.new_tokens, res.target_calls)
    return {
        **common, "cell_id": cell.id, "L": cell.L, "K": s.get("K"),
        "branching": "-".join(map(str, s["branching"])) if s.get("branching") else None,
        "width": s.get("W", s.get("width") if "branching" in s else None), "setting": cell.label,
        "example_id": ex.id, "example_index": index, "prompt_tokens": len(ids),
        "new_tokens": res.new_tokens, "target_calls": res.target_calls, "draft_calls": res.draft_calls,
        "decode_seconds": res.decode_seconds, "prefill_seconds": res.prefill_seconds,
        "draft_seconds": res.draft_seconds, "verify_seconds": res.verify_seconds,
        "overhead_seconds": res.overhead_seconds, "tokens_per_block": res.tokens_per_block,
        "depth_attempts": res.depth_attempts, "depth_accepts": res.depth_accepts,
        "nodes_per_call": sum(res.nodes_per_call) / max(1, len(res.nodes_per_call)),
        "block_efficiency": be,
        "mbsu": mbsu(be, common["draft_params"], common["target_params"], cell.L),
        "token_rate": token_rate(res.new_tokens, res.decode_seconds) if res.decode_seconds > 0 else float("nan"),
        "accuracy": sentence_score(metric, prediction, ex.reference),
        "prediction": prediction, "reference": ex.reference,
    }


def _fast_flag(value) -> bool | str:
    text = str(value).lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"pair.fast must be auto, true or false, got {value!r}")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
