"""Structured-config schemas for the Hydra configs in conf/: a typo fails at composition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from .datasets import DatasetConfig


@dataclass
class PairConfig:
    name: str = "embedded"
    target: str = "random-llama:layers-2:hidden-64:seed-0"  # hub id, local dir, "smollm2", ...
    draft: Optional[str] = None
    chat: bool = False  # prompt through the tokenizer's chat template
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"
    fast: str = "auto"  # static cache + CUDA graphs: auto (on GPU) | true | false
    max_context: int = 2048  # static cache size in the fast mode
    # fast mode: "parts" = compiled small ops (RMSNorm, rotary, SiLU*up, residual add + norm) and
    # Triton kernels for matmuls, KV writes and tree attention (7B decode on an H200: 7.55 ms
    # plain graphs -> 4.2-4.4 ms); "parts-cublas" = the compiled small ops only; "none" = plain
    # graphs; or a torch.compile mode for the whole forward (slower: see GraphedRunner)
    compile: str = "parts"
    # datasets this pair is evaluated on in multi-dataset sweeps (empty = all); the paper runs
    # base models on WMT and XSum only and chat models on Dolly too
    datasets: List[str] = field(default_factory=list)
    note: str = ""


@dataclass
class MethodConfig:
    """A method and its settings grid: a list value sweeps that parameter inside the job."""

    name: str = "sd"
    K: Any = None  # spectr: number of draft chains
    W: Any = None  # rsd_s: beam width
    width: Any = None  # rsd_c: width for branching_rule
    branching_rule: Optional[str] = None  # rsd_c: "first" = (w,1,..,1), "all" = (w,..,w)
    branching: Any = None  # rsd_c: explicit branching list (its length must equal L)
    params: Dict[str, Any] = field(default_factory=dict)  # parameters of plug-in methods


@dataclass
class PlotConfig:
    enabled: bool = True
    criterion: str = "block_efficiency"  # which setting of each (method, L) the grid shows
    rows: Optional[List[str]] = None  # "pair/dataset" in display order; default: sweep order


@dataclass
class RunConfig:
    pair: PairConfig = field(default_factory=PairConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    experiment: str = "default"  # results go to runs/<experiment>
    L: Any = field(default_factory=lambda: [2, 3, 4, 5])  # draft lengths (int or list)
    grid_limit: Optional[int] = None  # use only the first N values of each settings list
    # per-method settings that replace the method config's, e.g. {rsd_s: {W: [2, 4]}}; lets one
    # multirun over several methods give each its own grid
    grids: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    temperature: float = 1.0
    top_p: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    warmup_tokens: int = 16  # one unrecorded generation per job before timing
    results_dir: str = "runs/${experiment}"
    plot: PlotConfig = field(default_factory=PlotConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="pair", name="base_pair", node=PairConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="method", name="base_method", node=MethodConfig)
