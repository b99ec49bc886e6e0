#!/usr/bin/env python
"""Engine benchmark: how close the fast mode gets to the hardware, and what the methods gain end to end.

Sections (each in its own try/except: an error is recorded and the next section runs; the JSON
report is rewritten after every section, so a run killed at its time limit keeps what it did):

  bandwidth    device-to-device copy bandwidth (bytes read + written), the weight-streaming floor's
               denominator.
  ar           AR decode ms/token of Llama-2-7B- and 13B-shaped models with random bf16 weights at
               --context tokens of context, eager ModelRunner vs GraphedRunner (static cache + CUDA
               graphs), against the floor = streamed weight bytes / copy bandwidth. Goal: fast mode's
               floor/time >= 0.70.
  tree         one fast-mode target forward over a random tree of N nodes (random parents, positions by
               depth) divided by one AR step, 7B shape. Goals: <= 1.15 up to N = 16, <= 1.3 at N = 64.
  diagnostics  where a decode step's time goes: host costs (synchronize, pageable vs pinned H2D
               copies of the sizes the fast runner's masks have, host mask building) and a
               torch.profiler view of one un-graphed 7B step (GPU time by kernel kind) and of one
               eager ModelRunner step (kernel launches and their host cost).
  overhead     engine.generate with the 7B-shaped target and a small random draft in fast mode, for
               sd/spectr/rsd_c/rsd_s at L = 4: overhead_seconds / decode_seconds (the engine's
               "overhead" phase: target sampling, verification walk, cache compaction). Then all time
               outside the model forwards (draft-tree building and sampling included), measured
               twice: with every forward GPU-synchronized and wall-timed (no host/GPU overlap: an
               upper bound), and on the GPU timeline (CUDA events around each forward, nothing
               synchronized: (decode time - forwards' GPU time) / decode time). Goal: the
               timeline share <= 10 %.
               Random weights: two unrelated, fairly flat distributions, so the acceptance there is
               not that of a trained pair (the block efficiency is reported alongside).
  e2e          the real offline pair (--pair-target, default "smollm2"; --draft): token rate of every
               method over our AR at each L, decode-only (GenerationResult) and wall clock around
               Pair.generate (prefill included), and SD against Hugging Face assisted generation at
               the same L (wall clock of generate(), after a warm-up call).
  equivalence  fast (GraphedRunner) vs eager (ModelRunner) on the same pair: greedy tokens of AR and
               RSD-S, and the max |logit difference| of one tree forward.

--quick runs everything with tiny shapes (and a tiny random pair) so the whole script runs on a CPU
in seconds; tests/test_bench_engine.py does that.

Run on a GPU (the lead's command):
  PYTHONUNBUFFERED=1 python scripts/bench_engine.py --out $OUT/bench_engine.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SECTIONS = ("bandwidth", "ar", "tree", "diagnostics", "overhead", "e2e", "equivalence")

# (hidden, layers, heads, intermediate, vocab): Llama-2 shapes, and a ~68M draft.
SHAPES = {
    "7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000),
    "13b": dict(hidden=5120, layers=40, heads=40, intermediate=13824, vocab=32000),
    "draft": dict(hidden=768, layers=2, heads=12, intermediate=3072, vocab=32000),
}
QUICK_SHAPES = {
    "7b": dict(hidden=64, layers=2, heads=4, intermediate=172, vocab=512),
    "13b": dict(hidden=80, layers=3, heads=5, intermediate=216, vocab=512),
    "draft": dict(hidden=32, layers=1, heads=2, intermediate=64, vocab=512),
}

# Sizes: full run (GPU) / --quick (CPU, tiny). A flag given on the command line wins.
PROFILES = {
    "full": dict(context=512, capacity=1024, ar_steps=64, warmup=8, copy_mib=2048, copy_reps=10,
                 tree_sizes="3,6,16,32,64", tree_reps=30, overhead_methods="sd,spectr,rsd_c,rsd_s",
                 overhead_L=4, overhead_new_tokens=128, e2e_methods="sd,spectr,rsd_c,rsd_s",
                 e2e_L="2,3,4,5", max_new_tokens=128, prompts_per_dataset=1, max_prompt_tokens=1024,
                 max_context=2048, equiv_new_tokens=64, hf_warmup_tokens=16, budget_seconds=120.0,
                 e2e_budget_seconds=270.0, hf_prompts=1, total_budget_seconds=480.0, pair_target="smollm2", draft="pkg:smollm2-draft"),
    "quick": dict(context=24, capacity=256, ar_steps=4, warmup=2, copy_mib=16, copy_reps=3,
                  tree_sizes="3,6,16", tree_reps=3, overhead_methods="sd,spectr,rsd_c,rsd_s",
                  overhead_L=4, overhead_new_tokens=8, e2e_methods="sd,spectr,rsd_c,rsd_s",
                  e2e_L="2,3", max_new_tokens=8, prompts_per_dataset=1, max_prompt_tokens=200,
                  max_context=512, equiv_new_tokens=8, hf_warmup_tokens=4, budget_seconds=60.0,
                  e2e_budget_seconds=60.0, hf_prompts=2, total_budget_seconds=300.0, pair_target="random-llama:seed=0",
                  draft="random-llama:layers=1,hidden=32,seed=1"),
}

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in str(text).replace(" ", "").split(",") if x]


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and a tiny random pair (CPU smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", default=None, help="JSON report (default $OUT/bench_engine.json if $OUT is set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cudnn-sdp", action="store_true", help="disable cuDNN's SDPA kernels for the whole run "
                   "(SDPA then uses the memory-efficient kernel for masked attention)")
    p.add_argument("--blas", default="", help="torch.backends.cuda.preferred_blas_library for the whole run "
                   "(cublas, cublaslt); empty = PyTorch's default")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="per-section time box: remaining repetitions / runs are skipped when over")
    p.add_argument("--total-budget-seconds", type=float, default=None,
                   help="sections not started by then are skipped (the whole run should end before it "
                        "+ one section's budget)")
    g = p.add_argument_group("ar / tree / overhead (random Llama-shaped models)")
    g.add_argument("--shapes", default="7b,13b", help="AR section: comma list of 7b, 13b")
    g.add_argument("--context", type=int, default=None, help="tokens of context before timing")
    g.add_argument("--capacity", type=int, default=None, help="GraphedRunner static cache entries")
    g.add_argument("--ar-steps", type=int, default=None, help="timed decode steps per runner")
    g.add_argument("--warmup", type=int, default=None, help="untimed decode steps first")
    g.add_argument("--copy-mib", type=int, default=None, help="copy buffer size for the bandwidth")
    g.add_argument("--copy-reps", type=int, default=None)
    g.add_argument("--compile", default="", help="AR section: also time the fast runner with torch.compile "
                   "in these modes, comma list (e.g. default,max-autotune-no-cudagraphs); empty = skip")
    g.add_argument("--tree-compile", default="", help="tree, diagnostics and overhead sections: compile "
                   "mode of their fast runners, e.g. parts (empty = uncompiled)")
    g.add_argument("--tree-sizes", default=None, help="tree node counts, e.g. 3,6,16,32,64")
    g.add_argument("--tree-reps", type=int, default=None)
    g.add_argument("--overhead-methods", default=None)
    g.add_argument("--overhead-L", type=int, default=None)
    g.add_argument("--overhead-new-tokens", type=int, default=None)
    g.add_argument("--overhead-profile", action="store_true", help="overhead section: also run each method "
                   "once under cProfile and report the functions with the most host time")
    g = p.add_argument_group("e2e / equivalence (a real pair)")
    g.add_argument("--pair-target", default=None, help="target model spec (default smollm2; "
                   "any rsd_bench.pair spec: random-llama:..., a local dir, ...)")
    g.add_argument("--pair-draft", "--draft", dest="draft", default=None,
                   help="draft model spec or path (default pkg:smollm2-draft)")
    g.add_argument("--hf-draft", default=None,
                   help="an untrimmed HF draft for the HF assisted-generation comparison (default: the "
                        "pair's draft; a trimmed-vocabulary draft is wrapped as an exact HF equivalent)")
    g.add_argument("--no-hf", action="store_true", help="skip the Hugging Face assisted-generation runs")
    g.add_argument("--hf-prompts", type=int, default=None, help="prompts per HF measurement (HF is slow)")
    g.add_argument("--e2e-budget-seconds", type=float, default=None, help="time box of the e2e section")
    g.add_argument("--data-dir", default=None,
                   help="real data (wmt18-de-en/, xsum/, dolly/); default $RSD_BENCH_DATA, else "
                        "../shared/data beside the checkout; falls back to the embedded samples")
    g.add_argument("--prompts-per-dataset", type=int, default=None)
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longer inputs are shortened")
    g.add_argument("--e2e-methods", default=None)
    g.add_argument("--e2e-L", default=None, help="draft lengths, e.g. 2,3,4,5")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-context", type=int, default=None, help="fast runners' cache (load_pair max_context)")
    g.add_argument("--pair-compile", default="parts", help="fast runners' compile mode for the real pair "
                   "(load_pair compile: parts | none | a torch.compile mode)")
    g.add_argument("--equiv-new-tokens", type=int, default=None)
    g.add_argument("--hf-warmup-tokens", type=int, default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        out_dir = os.environ.get("OUT")
        args.out = str(Path(out_dir) / "bench_engine.json") if out_dir else "bench_engine.json"
    unknown = set(_names(args.sections)) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.hit = False

    def over(self) -> bool:
        if time.perf_counter() - self.start > self.seconds:
            self.hit = True
        return self.hit

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def _round(x, nd=4):
    if isinstance(x, float):
        return round(x, nd) if math.isfinite(x) else None
    return x


def _err() -> str:
    return traceback.format_exc(limit=8).strip()[-3000:]


def write_json(path: str, report: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out)


def gpu_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------
# random Llama-shaped models
# ------------------------------------------------------------------------------------------------
def llama_config(shape: dict):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:  # pragma: no cover - read-only in some versions
        pass
    return cfg


def build_random_llama(shape: dict, dtype: torch.dtype, dev: torch.device, seed: int):
    """A LlamaForCausalLM with transformers' random init (normal, std 0.02), built directly on `dev` in `dtype`."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        with torch.device(dev):
            try:
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
            except TypeError:  # older keyword
                model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=dev, dtype=dtype).eval()
    # Draw the weights here whatever the transformers version's init does (some skip it or leave
    # empty memory): matrices ~ N(0, 0.02) like Llama's initializer_range, norm weights 1.
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model


def overhead_pair(dev: torch.device, quick: bool, context: int, capacity: int):
    """The overhead section's setting for the scripts beside this one (bench_block_ab, profile_host):
    a 7B-shaped random target and the 2-layer random draft as fast runners (compile="parts" on a
    GPU), with the small buckets captured, and a random prompt of `context` tokens.
    Returns (target, draft, prompt, vocab)."""
    from rsd_bench.graphed_lm import GraphedRunner

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = QUICK_SHAPES if quick else SHAPES
    vocab = shapes["7b"]["vocab"]
    compile_mode = "parts" if dev.type == "cuda" else False
    runners = [GraphedRunner(build_random_llama(shapes[name], dtype, dev, seed), vocab_size=vocab, capacity=capacity,
                             compile=compile_mode) for name, seed in (("7b", 7), ("draft", 68))]
    for r in runners:
        r.capture(32)
    prompt = torch.randint(3, vocab, (context,), generator=torch.Generator().manual_seed(2)).tolist()
    return runners[0], runners[1], prompt, vocab


def weight_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes a decode step streams = all but an untied input embedding)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    streamed = total if tied else total - emb.numel() * emb.element_size()
    return total, streamed


def kv_bytes(model, tokens: int) -> int:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elt = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv * hd * tokens * elt


class State:
    """What sections share: the device, one cached random model, the bandwidth, the loaded pair."""

    def __init__(self, args, dev: torch.device, dtype: torch.dtype):
        self.args, self.dev, self.dtype = args, dev, dtype
        self.shapes = QUICK_SHAPES if args.quick else SHAPES
        self.model_key = None
        self.model = None
        self.bandwidth = None  # bytes/s (read + written)
        self.pair = None
        self.pair_error = None
        self.prompts = None
        self.prompt_info = None

    def random_model(self, key: str):
        if self.model_key == key and self.model is not None:
            return self.model
        self.drop_model()
        shape = self.shapes[key]
        t = time.perf_counter()
        seed = self.args.seed + {"7b": 7, "13b": 13}.get(key, 0)
        self.model = build_random_llama(shape, self.dtype, self.dev, seed)
        self.model_key = key
        log(f"built random {key}-shaped Llama ({sum(p.numel() for p in self.model.parameters()) / 1e9:.2f} B "
            f"params, {self.dtype}) in {time.perf_counter() - t:.1f}s")
        return self.model

    def drop_model(self) -> None:
        self.model = None
        self.model_key = None
        free_memory(self.dev)

    def drop_pair(self) -> None:
        self.pair = None
        free_memory(self.dev)


# ------------------------------------------------------------------------------------------------
# section: bandwidth
# ------------------------------------------------------------------------------------------------
def measure_copy_bandwidth(dev: torch.device, mib: int, reps: int) -> dict:
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    src.random_(0, 255) if dev.type == "cpu" else src.fill_(7)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t
        if i >= 2:
            times.append(dt)
    del src, dst
    free_memory(dev)
    med = statistics.median(times)
    return {"buffer_bytes": n, "reps": reps, "median_seconds": med,
            "bytes_per_second": 2 * n / med, "gb_per_s": 2 * n / med / 1e9,
            "all_gb_per_s": [round(2 * n / t / 1e9, 1) for t in times]}


def section_bandwidth(state: State, sec: dict, budget: Budget) -> None:
    a = state.args
    r = measure_copy_bandwidth(state.dev, a.copy_mib, a.copy_reps)
    state.bandwidth = r["bytes_per_second"]
    sec.update(r)
    log(f"device-to-device copy: {r['gb_per_s']:.0f} GB/s (read + written, median of {a.copy_reps})")


def ensure_bandwidth(state: State) -> float | None:
    if state.bandwidth is None:
        try:
            r = measure_copy_bandwidth(state.dev, state.args.copy_mib, state.args.copy_reps)
            state.bandwidth = r["bytes_per_second"]
        except Exception:
            log("bandwidth measurement failed:\n" + _err())
    return state.bandwidth


# ------------------------------------------------------------------------------------------------
# section: ar
# ------------------------------------------------------------------------------------------------
def time_ar(runner, dev, context: int, steps: int, warmup: int, vocab: int, budget: Budget,
            seed: int = 0) -> dict:
    """ms per AR step (forward of one token + argmax to the host) after `context` tokens."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (context,), generator=g).tolist()
    runner.reset(context + warmup + steps + 8)
    runner.forward(prompt[:-1], list(range(context - 1)), None)
    if hasattr(runner, "capture"):
        runner.capture(1)
    tok, pos = prompt[-1], context - 1

    def step():
        nonlocal tok, pos
        logits = runner.forward([tok], [pos], None)
        tok = int(logits[-1].argmax())
        pos += 1

    for _ in range(warmup):
        step()
    sync(dev)
    done = 0
    t = time.perf_counter()
    for _ in range(steps):
        step()
        done += 1
        if done >= 4 and budget.over():
            break
    sync(dev)
    ms = (time.perf_counter() - t) / done * 1e3
    out = {"ms_per_token": ms, "steps": done}
    graphs = getattr(runner, "_graphs", None)
    if graphs and 1 in graphs and dev.type == "cuda":  # GPU time of the bucket-1 graph alone
        graph = graphs[1][0]
        for _ in range(3):
            graph.replay()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 20
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        out["graph_replay_ms"] = a.elapsed_time(b) / reps
    return out


def unfuse_if_parts(model, mode) -> None:
    """After a runner of compile mode `mode` is done: give a model patched by the "parts" modes
    its own forwards back, so later kinds and sections sharing it run unpatched unless they ask."""
    if str(mode).startswith("parts"):
        from rsd_bench.fused_ops import unfuse_small_ops

        unfuse_small_ops(model)


def section_ar(state: State, sec: dict, budget: Budget) -> None:
    from rsd_bench.graphed_lm import GraphedRunner
    from rsd_bench.lm import ModelRunner

    a = state.args
    bw = ensure_bandwidth(state)
    sec["bandwidth_gb_per_s"] = bw / 1e9 if bw else None
    sec["context"] = a.context
    sec["results"] = []
    shapes = _names(a.shapes)
    # the 7B model stays loaded for the tree and overhead sections when it is built last
    order = sorted(shapes, key=lambda s: s == "7b")
    rows = {}
    for key in order:
        row = {"model": key, "shape": state.shapes[key]}
        rows[key] = row
        if budget.over():
            row["skipped"] = "section budget"
            continue
        try:
            model = state.random_model(key)
            total, streamed = weight_bytes(model)
            row.update(params=sum(p.numel() for p in model.parameters()), weight_bytes=total,
                       streamed_weight_bytes=streamed, kv_bytes_at_context=kv_bytes(model, a.context),
                       kv_bytes_at_capacity=kv_bytes(model, a.capacity))
            if bw:
                row["floor_ms"] = streamed / bw * 1e3
                row["floor_with_kv_ms"] = (streamed + kv_bytes(model, a.context)) / bw * 1e3
            vocab = state.shapes[key]["vocab"]
            kinds = ["eager", "fast"] + [f"fast+compile:{m}" for m in _names(a.compile)]
            for kind in kinds:
                if budget.over():
                    row[kind] = {"skipped": "section budget"}
                    continue
                runner = None
                try:
                    t_build = time.perf_counter()
                    mode = kind.partition(":")[2] or False  # the compile mode of "fast+compile:<mode>"
                    if kind == "eager":
                        runner = ModelRunner(model, vocab_size=vocab)
                    else:
                        runner = GraphedRunner(model, vocab_size=vocab, capacity=a.capacity, compile=mode)
                        if mode:  # compile + capture before timing (time_ar's capture is then a no-op)
                            runner.reset(a.context + a.warmup + a.ar_steps + 8)
                            runner.capture(1)
                    setup_s = time.perf_counter() - t_build
                    r = time_ar(runner, state.dev, a.context, a.ar_steps, a.warmup, vocab, budget, a.seed)
                    if mode:
                        r["compile_and_capture_seconds"] = setup_s
                    if getattr(runner, "fused", None):  # compile "parts": modules fused, by kind
                        r["fused"] = runner.fused
                    if getattr(runner, "attention_choice", None):
                        r["attention_choice"] = {str(b): c for b, c in runner.attention_choice.items()}
                    if bw:
                        r["fraction_of_floor"] = row["floor_ms"] / r["ms_per_token"]
                        if "graph_replay_ms" in r:
                            r["graph_fraction_of_floor"] = row["floor_ms"] / r["graph_replay_ms"]
                    row[kind] = r
                    log(f"AR {key} {kind}: {r['ms_per_token']:.2f} ms/token"
                        + (f", floor {row['floor_ms']:.2f} ms -> {r['fraction_of_floor']:.0%} of floor" if bw else "")
                        + (f" (graph replay alone {r['graph_replay_ms']:.2f} ms)" if "graph_replay_ms" in r else ""))
                except Exception:
                    row[kind] = {"error": _err()}
                    log(f"AR {key} {kind} failed:\n{row[kind]['error']}")
                finally:
                    runner = None
                    unfuse_if_parts(model, mode)  # later kinds and sections get the model's own forwards back
                    free_memory(state.dev)
        except Exception:
            row["error"] = _err()
            log(f"AR {key} failed:\n{row['error']}")
            state.drop_model()
    sec["results"] = [rows[k] for k in shapes if k in rows]
    sec["goal"] = "fast mode: floor / time >= 0.70"
    if budget.hit:
        sec["partial"] = "section budget hit"


# ------------------------------------------------------------------------------------------------
# section: tree
# ------------------------------------------------------------------------------------------------
def random_tree(n: int, gen: torch.Generator) -> tuple[list[int], list[int], torch.Tensor]:
    """(parents, depths, ancestor mask [n, n]) of a random tree: node i's parent is uniform in [0, i)."""
    parents, depth = [-1], [0]
    for i in range(1, n):
        p = int(torch.randint(0, i, (1,), generator=gen))
        parents.append(p)
        depth.append(depth[p] + 1)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return parents, depth, mask


def section_tree(state: State, sec: dict, budget: Budget) -> None:
    from rsd_bench.graphed_lm import GraphedRunner

    a = state.args
    sizes = _ints(a.tree_sizes)
    model = state.random_model("7b")
    vocab = state.shapes["7b"]["vocab"]
    runner = GraphedRunner(model, vocab_size=vocab, capacity=a.capacity, compile=a.tree_compile or False)
    sec["compile"] = a.tree_compile or None
    if runner.fused:
        sec["fused"] = runner.fused
    try:
        gen = torch.Generator().manual_seed(a.seed + 1)
        ctx = a.context
        prompt = torch.randint(3, vocab, (ctx,), generator=gen).tolist()
        runner.reset(ctx + max(sizes) + 8)
        runner.forward(prompt[:-1], list(range(ctx - 1)), None)
        base = runner.length
        runner.capture(max(sizes))
        cases = {}
        for n in [1] + sizes:
            parents, depth, mask = random_tree(n, gen)
            tokens = [prompt[-1]] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist()
            cases[n] = dict(tokens=tokens, positions=[base + d for d in depth], mask=mask,
                            depth=max(depth), times=[])
        warm = 2
        for rep in range(warm + a.tree_reps):
            for n, c in cases.items():
                sync(state.dev)
                t = time.perf_counter()
                runner.forward(c["tokens"], c["positions"], c["mask"])
                sync(state.dev)
                dt = time.perf_counter() - t
                runner.keep(base, [])
                if rep >= warm:
                    c["times"].append(dt)
            if rep >= warm + 2 and budget.over():
                break
        ar_ms = statistics.median(cases[1]["times"]) * 1e3
        graphs = getattr(runner, "_graphs", {})
        replay = {}
        if graphs and state.dev.type == "cuda":  # GPU time per bucket, back to back, no host work
            for bucket, entry in sorted(graphs.items()):
                g = entry[0]
                g.replay()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(10):
                    g.replay()
                e1.record()
                e1.synchronize()
                replay[bucket] = e0.elapsed_time(e1) / 10
        rows = []
        for n in sizes:
            c = cases[n]
            ms = statistics.median(c["times"]) * 1e3
            bucket = runner._bucket(n)
            row = {"nodes": n, "bucket": bucket, "depth": c["depth"], "ms": ms, "ar_ms": ar_ms,
                   "ratio": ms / ar_ms, "reps": len(c["times"]),
                   "goal": 1.15 if n <= 16 else 1.3 if n <= 64 else None}
            if replay and bucket in replay and 1 in replay:
                row["graph_replay_ms"] = replay[bucket]
                row["graph_ratio"] = replay[bucket] / replay[1]
            row["meets_goal"] = row["goal"] is None or row["ratio"] <= row["goal"]
            rows.append(row)
            log(f"tree N={n} (bucket {bucket}, depth {c['depth']}): {ms:.2f} ms = {ms / ar_ms:.3f} x AR step "
                f"({ar_ms:.2f} ms)" + (f"; graph replay alone {row['graph_ratio']:.3f} x" if "graph_ratio" in row else ""))
        sec["ar_step_ms"] = ar_ms
        sec["graph_replay_ms_by_bucket"] = replay
        sec["attention_choice"] = {str(b): c for b, c in getattr(runner, "attention_choice", {}).items()}
        sec["results"] = rows
        sec["goal"] = "ratio <= 1.15 up to N = 16, <= 1.3 at N = 64"
        if budget.hit:
            sec["partial"] = "section budget hit"
    finally:
        runner = None
        unfuse_if_parts(model, a.tree_compile)  # the diagnostics and overhead sections reuse this model
        free_memory(state.dev)


# ------------------------------------------------------------------------------------------------
# section: diagnostics
# ------------------------------------------------------------------------------------------------
def _dev_time(evt) -> float:
    """Self device time (us) of a profiler average, whatever this torch version calls it."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemv", "gemm", "cutlass", "sm90_xmma", "cublas", "nvjet", "splitk", "_dot_kernel")):
        return "matmul"
    if any(k in n for k in ("fmha", "attention", "flash", "efficient", "softmax")):
        return "attention"
    if "copy" in n or "memcpy" in n or "memset" in n or "index" in n or "scatter" in n or "gather" in n:
        return "copy/index"
    return "elementwise/other"


def profile_forward(runner_fn, dev) -> dict:
    """Kernels (GPU) and kernel launches (host) of one call of runner_fn, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        runner_fn()
        sync(dev)
    wall = (time.perf_counter() - t) * 1e3
    out = {"wall_ms_under_profiler": wall}
    avgs = prof.key_averages()
    launches = [e for e in avgs if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                             "cuLaunchKernelEx", "cudaGraphLaunch")]
    if launches:
        n = sum(e.count for e in launches)
        cpu_us = sum(e.cpu_time_total for e in launches)
        out["kernel_launches"] = n
        out["launch_cpu_us_mean"] = cpu_us / n if n else None
        out["launch_cpu_ms_total"] = cpu_us / 1e3
    if dev.type == "cuda":
        by_name: dict[str, list] = {}
        for e in avgs:  # kernel entries carry device_type CUDA
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                d = by_name.setdefault(e.key, [0, 0.0])
                d[0] += e.count
                d[1] += max(_dev_time(e), float(getattr(e, "device_time_total", 0.0) or 0.0))
        if not by_name:  # older layouts: walk the raw events
            for e in prof.events():
                if str(getattr(e, "device_type", "")).endswith("CUDA"):
                    d = by_name.setdefault(e.name, [0, 0.0])
                    d[0] += 1
                    d[1] += float(e.time_range.elapsed_us())
        total = sum(v[1] for v in by_name.values())
        kinds: dict[str, float] = {}
        for name, (c, us) in by_name.items():
            kinds[_kernel_kind(name)] = kinds.get(_kernel_kind(name), 0.0) + us
        out["gpu_kernels"] = sum(v[0] for v in by_name.values())
        out["gpu_kernel_ms_total"] = total / 1e3
        out["gpu_ms_by_kind"] = {k: v / 1e3 for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
        out["top_kernels"] = [{"name": k[:120], "calls": c, "ms": us / 1e3} for k, (c, us) in top]
    else:
        top = sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:8]
        out["top_cpu_ops"] = [{"name": e.key[:80], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                              for e in top]
    return out


def section_diagnostics(state: State, sec: dict, budget: Budget) -> None:
    """Where the time of a decode step goes: host costs, and the kernels of one un-graphed 7B step."""
    from rsd_bench.graphed_lm import GraphedRunner
    from rsd_bench.lm import ModelRunner

    a = state.args
    dev = state.dev
    host = {}
    if dev.type == "cuda":
        def timed(fn, n):
            sync(dev)
            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync(dev)
            return (time.perf_counter() - t) / n * 1e6

        x = torch.zeros(1, device=dev)
        host["synchronize_us"] = timed(lambda: torch.cuda.synchronize(dev), 100)
        host["item_us"] = timed(lambda: x.item(), 100)
        h2d = {}
        for kb in (16, 64, 128, 1024):
            src = torch.zeros(kb * 256)
            pinned = src.pin_memory()
            dst = torch.empty_like(src, device=dev)
            h2d[f"{kb}KiB"] = {"pageable_us": timed(lambda: dst.copy_(src, non_blocking=True), 20),
                               "pinned_us": timed(lambda: dst.copy_(pinned, non_blocking=True), 20)}
        host["h2d_copy"] = h2d
    model = state.random_model("7b")
    vocab = state.shapes["7b"]["vocab"]
    # the un-graphed step runs the same kernels the tree section's graphs hold (--tree-compile)
    runner = GraphedRunner(model, vocab_size=vocab, capacity=a.capacity, use_graphs=False,
                           compile=a.tree_compile or False)
    sec["compile"] = a.tree_compile or "none"
    try:
        ctx = a.context
        runner.reset(ctx + 16)
        runner.forward(list(range(3, 3 + ctx - 1)), list(range(ctx - 1)), None)
        base = runner.length
        for bucket in (1, 64):
            if bucket > max(runner.buckets):
                continue
            _, depth, mask = random_tree(bucket, torch.Generator().manual_seed(0))
            tokens, positions = [7] * bucket, [base + d for d in depth]
            # the host side of a bucket call: its inputs packed for the two copies (the mask
            # itself is built inside the graph)
            t = time.perf_counter()
            for _ in range(10):
                used = runner._pack(tokens, positions, bucket, mask)
            host[f"input_pack_us_bucket{bucket}"] = (time.perf_counter() - t) / 10 * 1e6
            host[f"input_bytes_bucket{bucket}"] = used + (2 * bucket + 3) * 8
        sec["host"] = host
        if budget.over():
            return

        def static_step():
            runner.forward([7], [base], None)
            runner.keep(base, [])

        static_step()
        sec["static_step_bucket1"] = profile_forward(static_step, dev)
        log("diagnostics: un-graphed static 7B step: " + json.dumps(
            {k: sec["static_step_bucket1"].get(k) for k in ("gpu_kernels", "gpu_kernel_ms_total", "gpu_ms_by_kind",
                                                            "kernel_launches", "launch_cpu_us_mean")}, default=str))
        # the same step over a small tree, with each attention kernel: where a tree's extra GPU
        # time goes (the tree section's ratio is the graphed version of this)
        from rsd_bench.graphed_lm import _set_attention

        impl0 = model.config._attn_implementation
        try:
            for rows in (4, 16):
                _, depth, tmask = random_tree(rows, torch.Generator().manual_seed(rows))
                for impl in ("sdpa", "eager"):
                    if budget.over():
                        break
                    _set_attention(model, impl)

                    def tree_step(rows=rows, depth=depth, tmask=tmask):
                        runner.forward([7] * rows, [base + d for d in depth], tmask)
                        runner.keep(base, [])

                    tree_step()
                    key = f"static_step_tree{rows}_{impl}"
                    sec[key] = profile_forward(tree_step, dev)
                    log(f"diagnostics: un-graphed 7B step over a {rows}-node tree, {impl} attention: "
                        + json.dumps({k: sec[key].get(k) for k in ("gpu_kernels", "gpu_kernel_ms_total",
                                                                   "gpu_ms_by_kind")}, default=str))
        finally:
            _set_attention(model, impl0)
        runner = None
        free_memory(dev)
        if budget.over():
            return
        eager = ModelRunner(model, vocab_size=vocab)
        eager.reset(ctx + 16)
        eager.forward(list(range(3, 3 + ctx - 1)), list(range(ctx - 1)), None)

        def eager_step():
            eager.forward([7], [eager.length], None)

        eager_step()
        sec["eager_step"] = profile_forward(eager_step, dev)
        log("diagnostics: eager ModelRunner 7B step: " + json.dumps(
            {k: sec["eager_step"].get(k) for k in ("wall_ms_under_profiler", "gpu_kernel_ms_total", "kernel_launches",
                                                   "launch_cpu_us_mean", "launch_cpu_ms_total")}, default=str))
        if host:
            log("diagnostics: host " + json.dumps(host, default=lambda v: round(v, 1)))
    finally:
        runner = None
        unfuse_if_parts(model, a.tree_compile)  # the overhead section reuses this model
        free_memory(dev)


# ------------------------------------------------------------------------------------------------
# section: overhead
# ------------------------------------------------------------------------------------------------
class ForwardTimer:
    """Proxy of a runner that times each forward (GPU-synchronized before and after).

    The first forward after reset() is the engine's prefill and is counted apart. Draft levels
    run level by level under it (`fuse_draft_levels`): a forward inside the one-graph draft
    (draft_graph) cannot be synchronized around, so this upper bound is of the slower path.
    """

    fuse_draft_levels = False

    def __init__(self, runner, dev):
        self._runner, self._dev = runner, dev
        self.seconds = 0.0
        self.calls = 0
        self.prefill_seconds = 0.0
        self._first = True

    def reset(self, capacity):
        self._first = True
        return self._runner.reset(capacity)

    def forward(self, *args, **kwargs):
        return self._timed(self._runner.forward, *args, **kwargs)

    def forward_children(self, *args, **kwargs):
        return self._timed(self._runner.forward_children, *args, **kwargs)

    def forward_rows(self, *args, **kwargs):
        return self._timed(self._runner.forward_rows, *args, **kwargs)

    def _timed(self, call, *args, **kwargs):
        sync(self._dev)
        t = time.perf_counter()
        out = call(*args, **kwargs)
        sync(self._dev)
        dt = time.perf_counter() - t
        if self._first:
            self.prefill_seconds += dt
            self._first = False
        else:
            self.seconds += dt
            self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self._runner, name)


class ForwardEvents:
    """Proxy of a runner that marks each forward on the GPU timeline with CUDA events, without
    synchronizing, so host work keeps overlapping GPU work as in an uninstrumented run.

    `seconds()` (after a synchronize) sums the spans from when the stream reached each forward's
    start to its end: forward time as the GPU saw it, including any wait for the host inside the
    forward's own launches. On the CPU it falls back to wall time per forward. The first forward
    after reset() is the prefill and is left out.

    Draft forwards inside the one-graph draft levels (draft_graph) are marked by events recorded
    in the graph: `graph_replay(spans)` is called before each replay, and reads the last
    replay's spans before the events are recorded again.

    A runner with `span_events` (the fast runner) records a forward's span itself, after it has
    packed the call on the host: a span marked here, before the call, also holds the GPU's wait
    for that packing (e.g. the root draft call after the verification read). `seconds()` uses
    the runner's marks where it has them; `host_marked_seconds()` the marks made here, for
    comparison.
    """

    def __init__(self, runner, dev):
        self._runner, self._dev = runner, dev
        self._spans: list = []  # per forward: the runner's marks where it makes them, else ours
        self._host_spans: list = []  # per forward: ours
        self._graph_seconds = 0.0  # the draft graphs' in-graph spans, read so far
        self._graph_spans: list = []  # events of the last draft-graph replay, not read yet
        self._first = True
        self.calls = 0

    def graph_replay(self, spans):
        self._read_graph_spans()
        self._graph_spans = list(spans)
        self.calls += len(spans)

    def _read_graph_spans(self):
        for start, end in self._graph_spans:
            end.synchronize()  # done long ago: the block's verification read its results
            self._graph_seconds += start.elapsed_time(end) / 1e3
        self._graph_spans = []

    def reset(self, capacity):
        self._first = True
        return self._runner.reset(capacity)

    def forward(self, *args, **kwargs):
        return self._marked(self._runner.forward, *args, **kwargs)

    def forward_children(self, *args, **kwargs):
        return self._marked(self._runner.forward_children, *args, **kwargs)

    def forward_rows(self, *args, **kwargs):
        return self._marked(self._runner.forward_rows, *args, **kwargs)

    def _marked(self, call, *args, **kwargs):
        if self._first:
            self._first = False
            return call(*args, **kwargs)
        self.calls += 1
        if self._dev.type != "cuda":
            t = time.perf_counter()
            out = call(*args, **kwargs)
            self._spans.append(time.perf_counter() - t)
            self._host_spans.append(self._spans[-1])
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        inner = None
        if hasattr(self._runner, "span_events"):
            inner = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start.record()
        if inner is not None:
            self._runner.span_events = inner
        try:
            out = call(*args, **kwargs)
        finally:
            if inner is not None:
                self._runner.span_events = None
        end.record()
        self._spans.append(inner or (start, end))
        self._host_spans.append((start, end))
        return out

    @staticmethod
    def _sum(spans) -> float:
        return sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1e3 for s in spans)

    def host_marked_seconds(self) -> float:
        """seconds(), with every span marked here, before the runner packs its call."""
        sync(self._dev)
        self._read_graph_spans()
        return self._graph_seconds + self._sum(self._host_spans)

    def seconds(self) -> float:
        sync(self._dev)
        self._read_graph_spans()
        return self._graph_seconds + self._sum(self._spans)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def _result_row(res) -> dict:
    dec = res.decode_seconds
    return {
        "new_tokens": res.new_tokens, "target_calls": res.target_calls, "draft_calls": res.draft_calls,
        "block_efficiency": res.block_efficiency,
        "mean_nodes_per_call": statistics.mean(res.nodes_per_call) if res.nodes_per_call else None,
        "acceptance_per_depth": [_round(x) for x in res.acceptance_per_depth],
        "prefill_seconds": res.prefill_seconds, "decode_seconds": dec, "draft_seconds": res.draft_seconds,
        "verify_seconds": res.verify_seconds, "overhead_seconds": res.overhead_seconds,
        "overhead_fraction": res.overhead_seconds / dec if dec > 0 else None,
        "ms_per_block": dec / res.target_calls * 1e3 if res.target_calls else None,
        "tokens_per_second": res.tokens_per_second, "stop_reason": res.stop_reason,
    }


def _host_profile(run, blocks: int, top: int = 20) -> list[dict]:
    """The functions with the most own time (cProfile's tottime) in one run, in us per block.

    cProfile slows Python down, so the absolute numbers overstate; the ranking is what it is for.
    Time a host thread spends waiting for the GPU shows up in the call that waits (.tolist(),
    .item(), Event.synchronize).
    """
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({name})" if f != "~" else name,
             "calls_per_block": round(v[0] / blocks, 2), "own_us_per_block": round(v[2] / blocks * 1e6, 1),
             "cumulative_us_per_block": round(v[3] / blocks * 1e6, 1)} for (f, line, name), v in rows]


def section_overhead(state: State, sec: dict, budget: Budget) -> None:
    from rsd_bench.engine import generate
    from rsd_bench.graphed_lm import GraphedRunner
    from rsd_bench.methods import get_method

    a = state.args
    target_model = state.random_model("7b")
    vocab = state.shapes["7b"]["vocab"]
    draft_model = build_random_llama(state.shapes["draft"], state.dtype, state.dev, a.seed + 68)
    n_new = a.overhead_new_tokens
    cap = max(a.capacity, a.context + n_new + 64 + 128 + 64)
    # the fast mode as the tree section ran it (--tree-compile): faster forwards raise the share
    target = GraphedRunner(target_model, vocab_size=vocab, capacity=cap, compile=a.tree_compile or False)
    draft = GraphedRunner(draft_model, vocab_size=vocab, capacity=cap, compile=a.tree_compile or False)
    sec["compile"] = a.tree_compile or "none"
    sec["note"] = ("random weights: target and draft are two unrelated, fairly flat distributions, so the "
                   "acceptance (see block_efficiency) is not that of a trained pair; the overhead share is "
                   "measured at whatever acceptance they give")
    sec["L"] = a.overhead_L
    sec["new_tokens"] = n_new
    sec["results"] = []
    try:
        target.capture(32)
        draft.capture(32)
        gen = torch.Generator().manual_seed(a.seed + 2)
        prompt = torch.randint(3, vocab, (a.context,), generator=gen).tolist()
        common = dict(vocab_size=vocab, temperature=1.0, top_p=None)
        for name in _names(a.overhead_methods):
            row = {"method": name}
            sec["results"].append(row)
            if budget.over():
                row["skipped"] = "section budget"
                continue
            try:
                method = get_method(name)
                row["setting"] = method.setting_label(method.settings(a.overhead_L))
                generate(target, draft, prompt, name, a.overhead_L, max_new_tokens=min(16, n_new), seed=99, **common)
                res = generate(target, draft, prompt, name, a.overhead_L, max_new_tokens=n_new, seed=a.seed, **common)
                row.update(_result_row(res))
                # instrumented: all forwards timed, the rest is outside model forwards
                tt, dt = ForwardTimer(target, state.dev), ForwardTimer(draft, state.dev)
                res2 = generate(tt, dt, prompt, name, a.overhead_L, max_new_tokens=n_new, seed=a.seed, **common)
                fwd = tt.seconds + dt.seconds
                row["instrumented"] = {
                    "decode_seconds": res2.decode_seconds, "target_forward_seconds": tt.seconds,
                    "draft_forward_seconds": dt.seconds, "target_forwards": tt.calls, "draft_forwards": dt.calls,
                    "outside_forwards_fraction": (res2.decode_seconds - fwd) / res2.decode_seconds,
                    "draft_phase_outside_forwards_seconds": res2.draft_seconds - dt.seconds,
                    "verify_phase_outside_forward_seconds": res2.verify_seconds - tt.seconds,
                    "overhead_seconds": res2.overhead_seconds,
                }
                # GPU timeline: forwards marked by CUDA events, nothing synchronized around them, so
                # host work that overlaps a forward's GPU time does not count as outside it
                te, de = ForwardEvents(target, state.dev), ForwardEvents(draft, state.dev)
                res3 = generate(te, de, prompt, name, a.overhead_L, max_new_tokens=n_new, seed=a.seed, **common)
                t_fwd, d_fwd = te.seconds(), de.seconds()
                row["timeline"] = {
                    "decode_seconds": res3.decode_seconds, "target_forward_gpu_seconds": t_fwd,
                    "draft_forward_gpu_seconds": d_fwd, "target_forwards": te.calls, "draft_forwards": de.calls,
                    "outside_forwards_fraction": (res3.decode_seconds - t_fwd - d_fwd) / res3.decode_seconds,
                }
                row["meets_goal"] = row["timeline"]["outside_forwards_fraction"] <= 0.10
                if a.overhead_profile:
                    row["host_profile"] = _host_profile(lambda: generate(
                        target, draft, prompt, name, a.overhead_L, max_new_tokens=n_new, seed=a.seed, **common),
                        blocks=res.target_calls)
                log(f"overhead {name} L={a.overhead_L}: {row['ms_per_block']:.2f} ms/block, overhead phase "
                    f"{row['overhead_fraction']:.1%} of decode; outside all forwards "
                    f"{row['instrumented']['outside_forwards_fraction']:.1%} (synchronized around forwards), "
                    f"{row['timeline']['outside_forwards_fraction']:.1%} (GPU timeline); "
                    f"block efficiency {row['block_efficiency']:.2f}")
            except Exception:
                row["error"] = _err()
                log(f"overhead {name} failed:\n{row['error']}")
        sec["goal"] = ("(decode time - forwards' GPU time) / decode time <= 0.10 (timeline); the overhead "
                       "phase alone and the synchronized measure are reported beside it")
        if budget.hit:
            sec["partial"] = "section budget hit"
    finally:
        target = draft = draft_model = None
        unfuse_if_parts(target_model, a.tree_compile)
        free_memory(state.dev)


# ------------------------------------------------------------------------------------------------
# the real pair: loading, prompts
# ------------------------------------------------------------------------------------------------
def get_pair(state: State):
    if state.pair is not None:
        return state.pair
    if state.pair_error is not None:
        raise RuntimeError(f"the pair failed to load earlier: {state.pair_error}")
    from rsd_bench.pair import load_pair

    a = state.args
    t = time.perf_counter()
    try:
        state.pair = load_pair(a.pair_target, a.draft, dtype=state.dtype, device=str(state.dev), fast=True,
                               max_context=a.max_context, compile=a.pair_compile)
    except Exception as err:
        state.pair_error = f"{type(err).__name__}: {err}"
        raise
    p = state.pair
    log(f"loaded pair {a.pair_target} + {a.draft} in {time.perf_counter() - t:.1f}s: target "
        f"{p.target_params / 1e6:.1f} M params, draft {p.draft_params / 1e6:.1f} M, vocab {p.vocab_size}, "
        f"draft type {type(p.draft.model).__name__ if p.draft else None}")
    return p


def default_data_dir() -> Path | None:
    env = os.environ.get("RSD_BENCH_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


DATASETS = {  # name -> (local file under the data dir, DatasetConfig fields); prompts follow conf/dataset
    "wmt": ("wmt18-de-en/newstest2018", dict(
        name="wmt", src_suffix="de", tgt_suffix="en", embedded_file="wmt_sample.jsonl",
        input_field="translation.de", reference_field="translation.en",
        chat_prompt="Translate the following German text to English. Reply with the translation only.\n\n{input}")),
    "xsum": ("xsum/test_1000.jsonl", dict(
        name="xsum", embedded_file="xsum_sample.jsonl", input_field="document", reference_field="summary",
        chat_prompt="Summarize the following article in one sentence. Reply with the summary only.\n\n{input}")),
    "dolly": ("dolly/dolly15k_head.jsonl", dict(
        name="dolly", embedded_file="dolly_sample.jsonl", input_field="instruction", reference_field="response",
        context_field="context", chat_prompt="{input}\n\nContext: {context}")),
}


def _dataset_fields(name: str, defaults: dict) -> dict:
    """Fields from conf/dataset/<name>.yaml when readable (the harness's prompts), else the copies above."""
    path = REPO / "conf" / "dataset" / f"{name}.yaml"
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        keys = set(defaults) | {"system_prompt", "context_field"}
        return {k: cfg[k] for k in keys if k in cfg}
    except Exception:
        return dict(defaults)


def build_prompts(state: State, tokenizer) -> list[dict]:
    if state.prompts is not None:
        return state.prompts
    from rsd_bench.datasets import DatasetConfig, build_prompt, load_examples

    a = state.args
    data_dir = Path(a.data_dir).expanduser() if a.data_dir else default_data_dir()
    prompts, info = [], {}
    for name, (rel, defaults) in DATASETS.items():
        fields = _dataset_fields(name, defaults)
        local = data_dir / rel if data_dir else None
        use_local = local is not None and (local.is_file() or Path(f"{local}.de").is_file())
        n_try = max(20, a.prompts_per_dataset * 4)
        cfg = DatasetConfig(**fields, source="embedded", path=str(local) if use_local else None,
                            num_examples=n_try, offset=0)
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                examples = load_examples(cfg)
        except Exception:
            if not use_local:
                raise
            cfg.path, use_local = None, False  # the embedded sample instead
            examples = load_examples(cfg)
        info[name] = str(local) if use_local else f"embedded:{cfg.embedded_file}"
        taken = 0
        for ex in examples:
            if taken >= a.prompts_per_dataset:
                break
            ids = build_prompt(ex, cfg, tokenizer, chat=True)
            words = ex.input.split()
            while len(ids) > a.max_prompt_tokens and len(words) > 1:  # shorten long articles
                words = words[: len(words) * 2 // 3]
                ex = copy.copy(ex)
                ex.input = " ".join(words)
                ids = build_prompt(ex, cfg, tokenizer, chat=True)
            if len(ids) > a.max_prompt_tokens:
                continue
            prompts.append({"dataset": name, "id": ex.id, "ids": ids})
            taken += 1
    state.prompts, state.prompt_info = prompts, info
    log("prompts: " + ", ".join(f"{p['dataset']}:{p['id']} ({len(p['ids'])} tokens)" for p in prompts))
    return prompts


# ------------------------------------------------------------------------------------------------
# Hugging Face assisted generation
# ------------------------------------------------------------------------------------------------
def _is_trimmed(model) -> bool:
    try:
        from rsd_bench.trimmed_vocab import TrimmedVocabLM

        if isinstance(model, TrimmedVocabLM):
            return True
    except Exception:
        pass
    return all(hasattr(model, k) for k in ("inner", "in_map", "out_ids", "expand_logits"))


def trimmed_as_hf(tv):
    """The trimmed draft as a PreTrainedModel of its inner class: same modules (no copy), full-vocabulary
    input ids mapped in and logits expanded out (-inf off the kept set), config.vocab_size = full.

    It computes exactly the wrapper's distribution, so HF's speculative sampling sees the same draft.
    """
    inner = tv.inner
    base = type(inner)
    in_map, expand = tv.in_map, tv.expand_logits

    class TrimmedDraftForHF(base):
        def forward(self, *args, **kwargs):
            if args:
                kwargs["input_ids"], args = args[0], args[1:]
            ids = kwargs.get("input_ids")
            if ids is not None:
                kwargs["input_ids"] = in_map[ids]
            out = base.forward(self, *args, **kwargs)
            out.logits = expand(out.logits)
            return out

    TrimmedDraftForHF.__name__ = TrimmedDraftForHF.__qualname__ = f"Trimmed{base.__name__}"
    TrimmedDraftForHF.forward.__signature__ = inspect.signature(base.forward)
    adapter = copy.copy(inner)  # shares the submodules and weights
    adapter.__class__ = TrimmedDraftForHF
    cfg = copy.deepcopy(inner.config)
    cfg.vocab_size = int(tv.full_vocab_size)
    adapter.config = cfg
    if getattr(inner, "generation_config", None) is not None:
        adapter.generation_config = copy.deepcopy(inner.generation_config)
    return adapter


def hf_draft_for(state: State, pair):
    """(HF-usable draft model or None, how it was obtained)."""
    a = state.args
    if a.hf_draft:
        from rsd_bench.pair import load_model

        model, _ = load_model(a.hf_draft, state.dtype, state.dev)
        if _is_trimmed(model):
            return trimmed_as_hf(model), f"--hf-draft {a.hf_draft} (trimmed; wrapped as an exact HF equivalent)"
        return model, f"--hf-draft {a.hf_draft}"
    draft = pair.draft.model if pair.draft is not None else None
    if draft is None:
        return None, "not comparable: the pair has no draft"
    if _is_trimmed(draft):
        # Passing the wrapper itself would make HF call inner.generate with full-vocabulary ids (an
        # out-of-range embedding lookup, a device-side assert on CUDA), so it is never tried.
        try:
            return trimmed_as_hf(draft), ("trimmed-vocabulary draft wrapped as a PreTrainedModel subclass "
                                          "(same modules, same distribution); the wrapper itself is not a "
                                          "PreTrainedModel and HF would feed it full-vocabulary ids")
        except Exception as err:
            return None, f"not comparable: trimmed draft could not be wrapped for HF ({type(err).__name__}: {err})"
    from transformers import PreTrainedModel

    if isinstance(draft, PreTrainedModel):
        return draft, "the pair's draft as is"
    return None, f"not comparable: the draft is a {type(draft).__name__}, not a PreTrainedModel"


def hf_generate(target_model, draft_model, ids: list[int], L: int | None, max_new: int, temperature: float,
                pad_id, dev, accepted: dict):
    """One HF generate() call; returns (new tokens, seconds). `accepted` records kwargs that had to go."""
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
              max_new_tokens=max_new, pad_token_id=pad_id)
    if draft_model is not None:
        kw.update(assistant_model=draft_model, num_assistant_tokens=L, num_assistant_tokens_schedule="constant",
                  assistant_confidence_threshold=0.0)
        gc_ = draft_model.generation_config  # the candidate generator reads these from the assistant
        for k, v in (("num_assistant_tokens", L), ("num_assistant_tokens_schedule", "constant"),
                     ("assistant_confidence_threshold", 0.0)):
            try:
                setattr(gc_, k, v)
            except Exception:
                pass
    for k in accepted.get("dropped", []):
        kw.pop(k, None)
    while True:
        try:
            sync(dev)
            t = time.perf_counter()
            with torch.no_grad():
                out = target_model.generate(x, **kw)
            sync(dev)
            return int(out.shape[1] - x.shape[1]), time.perf_counter() - t
        except (TypeError, ValueError) as err:
            optional = [k for k in ("assistant_confidence_threshold", "num_assistant_tokens_schedule",
                                    "num_assistant_tokens", "top_k") if k in kw and k in str(err)]
            if not optional:
                raise
            for k in optional:
                kw.pop(k)
                accepted.setdefault("dropped", []).append(k)
                accepted.setdefault("why", []).append(f"{type(err).__name__}: {err}"[:300])


# ------------------------------------------------------------------------------------------------
# section: e2e
# ------------------------------------------------------------------------------------------------
def run_ours(pair, ids, method, L, a, seed, dev, max_new=None):
    sync(dev)
    t = time.perf_counter()
    res = pair.generate(ids, method, L, temperature=a.temperature, max_new_tokens=max_new or a.max_new_tokens,
                        seed=seed)
    sync(dev)
    return res, time.perf_counter() - t


def _agg(runs: list[dict]) -> dict:
    new = sum(r["new_tokens"] for r in runs)
    dec = sum(r["decode_seconds"] for r in runs)
    wall = sum(r["wall_seconds"] for r in runs)
    calls = sum(r["target_calls"] for r in runs)
    return {"runs": len(runs), "new_tokens": new, "decode_seconds": dec, "wall_seconds": wall,
            "tokens_per_second": new / dec if dec else None, "wall_tokens_per_second": new / wall if wall else None,
            "block_efficiency": new / calls if calls else None,
            "overhead_fraction": sum(r["overhead_seconds"] for r in runs) / dec if dec else None}


def section_e2e(state: State, sec: dict, budget: Budget) -> None:
    """Our methods over our AR at each L, and HF assisted generation (SD) at the same L.

    Order: our AR, HF AR, then per L our methods followed by HF SD at that L, so a budget cut
    drops whole (larger) L values and keeps the comparisons that did run complete.
    """
    from rsd_bench.methods import get_method

    a = state.args
    budget = Budget(a.e2e_budget_seconds)  # this section gets its own, larger time box
    pair = get_pair(state)
    prompts = build_prompts(state, pair.tokenizer)
    if not prompts:
        raise RuntimeError("no prompt fits --max-prompt-tokens")
    sec.update(pair_target=a.pair_target, draft=a.draft, target_params=pair.target_params,
               draft_params=pair.draft_params, vocab_size=pair.vocab_size,
               draft_type=type(pair.draft.model).__name__ if pair.draft else None,
               runner=type(pair.target).__name__, data=state.prompt_info,
               prompts=[{"dataset": p["dataset"], "id": p["id"], "tokens": len(p["ids"])} for p in prompts],
               max_new_tokens=a.max_new_tokens, temperature=a.temperature, budget_seconds=a.e2e_budget_seconds)
    Ls, methods = _ints(a.e2e_L), _names(a.e2e_methods)
    t = time.perf_counter()
    pair.prepare(64)
    for m in ["ar"] + methods:  # warm-up: lazily captured buckets, allocator, kernels
        pair.generate(prompts[0]["ids"], m, max(Ls), temperature=a.temperature,
                      max_new_tokens=min(16, a.max_new_tokens), seed=123)
    sec["warmup_seconds"] = time.perf_counter() - t

    def one_cell(method, L):
        # Each (method, L) builds its own graphs (draft levels, tree calls of its depth) at first
        # use: warm it up untimed, as HF gets a warm-up, so the wall times are steady state.
        pair.generate(prompts[0]["ids"], method, L, temperature=a.temperature,
                      max_new_tokens=min(16, a.max_new_tokens), seed=123)
        runs = []
        for i, p in enumerate(prompts):
            if budget.over() and runs:
                break
            res, wall = run_ours(pair, p["ids"], method, L, a, a.seed + i, state.dev)
            runs.append({"prompt": i, "new_tokens": res.new_tokens, "decode_seconds": res.decode_seconds,
                         "prefill_seconds": res.prefill_seconds, "wall_seconds": wall,
                         "target_calls": res.target_calls, "overhead_seconds": res.overhead_seconds,
                         "stop_reason": res.stop_reason})
        return runs

    ar_runs = one_cell("ar", 0)
    ar = _agg(ar_runs)
    sec["ar"] = {**ar, "per_prompt": ar_runs}
    log(f"e2e AR: {ar['tokens_per_second']:.1f} tok/s decode, {ar['wall_tokens_per_second']:.1f} tok/s wall")

    hf = HFComparison(state, pair, prompts, budget) if not a.no_hf else None
    sec["hf"] = hf.info if hf else {"status": "skipped (--no-hf)"}
    if hf:
        hf.run_ar(ar_runs)
    rows = []
    sec["results"] = rows
    for L in Ls:
        for m in methods:
            row = {"method": m, "L": L}
            rows.append(row)
            if budget.over():
                row["skipped"] = "section budget"
                continue
            try:
                meth = get_method(m)
                row["setting"] = meth.setting_label(meth.settings(L))
                runs = one_cell(m, L)
                row.update(_agg(runs))
                row["speedup_decode"] = row["tokens_per_second"] / ar["tokens_per_second"]
                row["speedup_wall"] = row["wall_tokens_per_second"] / ar["wall_tokens_per_second"]
                row["per_prompt"] = runs
                log(f"e2e {m} L={L} {row['setting']}: {row['tokens_per_second']:.1f} tok/s decode "
                    f"(x{row['speedup_decode']:.2f} over AR), {row['wall_tokens_per_second']:.1f} wall "
                    f"(x{row['speedup_wall']:.2f}), block efficiency {row['block_efficiency']:.2f}")
            except Exception:
                row["error"] = _err()
                log(f"e2e {m} L={L} failed:\n{row['error']}")
        if hf:
            ours = next((r for r in rows if r["method"] == "sd" and r["L"] == L and r.get("per_prompt")), None)
            hf.run_sd(L, ours)
    if hf:
        hf.finish()
    if budget.hit:
        sec["partial"] = "section budget hit"


class HFComparison:
    """Hugging Face generate(): plain sampling and assisted generation (SD), timed wall clock."""

    def __init__(self, state: State, pair, prompts, budget: Budget):
        import transformers

        a = state.args
        self.state, self.pair, self.budget, self.dev = state, pair, budget, state.dev
        self.prompts = prompts[: max(1, a.hf_prompts)]
        self.target = pair.target.model
        self.pad = next(iter(sorted(pair.eos_token_ids)), None)
        self.accepted: dict = {}
        self.info = {"status": "running", "transformers": transformers.__version__, "prompts": len(self.prompts),
                     "kwargs_dropped": self.accepted, "sd": []}
        try:
            self.info["target_generation_config"] = self.target.generation_config.to_diff_dict()
        except Exception:
            pass
        self.draft = None
        self.warmed = False
        try:
            self.draft, how = hf_draft_for(state, pair)
            self.info["draft"] = how
        except Exception:
            self.info["draft"] = "not comparable: " + _err()[-500:]

    def _runs(self, draft, L) -> list[dict]:
        a = self.state.args
        runs = []
        for i, p in enumerate(self.prompts):
            if self.budget.over() and runs:
                break
            torch.manual_seed(a.seed + i)
            n, s = hf_generate(self.target, draft, p["ids"], L, a.max_new_tokens, a.temperature, self.pad,
                               self.dev, self.accepted)
            runs.append({"prompt": i, "new_tokens": n, "seconds": s})
        return runs

    def run_ar(self, ours_runs):
        a = self.state.args
        try:
            hf_generate(self.target, None, self.prompts[0]["ids"], None, a.hf_warmup_tokens, a.temperature,
                        self.pad, self.dev, self.accepted)
            runs = self._runs(None, None)
            new, secs = sum(r["new_tokens"] for r in runs), sum(r["seconds"] for r in runs)
            ours = _agg([r for r in ours_runs if r["prompt"] < len(runs)])
            self.info["ar"] = {"runs": len(runs), "new_tokens": new, "seconds": secs, "tokens_per_second": new / secs,
                               "ours_wall_tokens_per_second_same_prompts": ours["wall_tokens_per_second"],
                               "ours_wall_over_hf": ours["wall_tokens_per_second"] / (new / secs)}
            log(f"HF AR generate: {new / secs:.1f} tok/s (ours AR wall on the same prompts "
                f"{ours['wall_tokens_per_second']:.1f})")
        except Exception:
            self.info["ar"] = {"error": _err()}
            log(f"HF AR failed:\n{self.info['ar']['error']}")

    def run_sd(self, L, ours_row):
        row = {"L": L}
        self.info["sd"].append(row)
        if self.draft is None:
            row["skipped"] = self.info.get("draft", "no HF draft")
            return
        if self.budget.over():
            row["skipped"] = "section budget"
            return
        a = self.state.args
        try:
            if not self.warmed:
                hf_generate(self.target, self.draft, self.prompts[0]["ids"], L, a.hf_warmup_tokens, a.temperature,
                            self.pad, self.dev, self.accepted)
                self.warmed = True
            runs = self._runs(self.draft, L)
            new, secs = sum(r["new_tokens"] for r in runs), sum(r["seconds"] for r in runs)
            row.update(runs=len(runs), new_tokens=new, seconds=secs, tokens_per_second=new / secs)
            if ours_row:
                same = _agg([r for r in ours_row["per_prompt"] if r["prompt"] < len(runs)])
                row["ours_sd_wall_tokens_per_second"] = same["wall_tokens_per_second"]
                row["ours_sd_tokens_per_second"] = same["tokens_per_second"]
                row["ours_wall_over_hf"] = same["wall_tokens_per_second"] / row["tokens_per_second"]
            log(f"HF assisted SD L={L}: {row['tokens_per_second']:.1f} tok/s over {len(runs)} prompt(s)"
                + (f"; ours SD (wall, same prompts) {row['ours_sd_wall_tokens_per_second']:.1f} -> "
                   f"x{row['ours_wall_over_hf']:.2f}" if ours_row else ""))
        except Exception:
            row["error"] = _err()
            log(f"HF SD L={L} failed:\n{row['error']}")

    def finish(self):
        self.info["status"] = "ok" if self.draft is not None else self.info.get("draft", "no HF draft")


# ------------------------------------------------------------------------------------------------
# section: equivalence
# ------------------------------------------------------------------------------------------------
def _first_mismatch(x: list[int], y: list[int]):
    for i, (u, v) in enumerate(zip(x, y)):
        if u != v:
            return i
    return None if len(x) == len(y) else min(len(x), len(y))


def _tree_logits(runner, ids: list[int], tokens: list[int], depth: list[int], mask: torch.Tensor):
    runner.reset(len(ids) + len(tokens) + 8)
    if len(ids) > 1:
        runner.forward(ids[:-1], list(range(len(ids) - 1)), None)
    root = len(ids) - 1
    return runner.forward(tokens, [root + d for d in depth], mask).float().cpu()


def section_equivalence(state: State, sec: dict, budget: Budget) -> None:
    from rsd_bench.engine import generate
    from rsd_bench.lm import ModelRunner

    a = state.args
    pair = get_pair(state)
    prompts = build_prompts(state, pair.tokenizer)
    ids = min(prompts, key=lambda p: len(p["ids"]))["ids"]
    fast_t, fast_d = pair.target, pair.draft
    eager_t = ModelRunner(fast_t.model, vocab_size=pair.vocab_size)
    eager_d = ModelRunner(fast_d.model, vocab_size=pair.vocab_size) if fast_d is not None else None
    sec.update(fast_runner=type(fast_t).__name__, eager_runner="ModelRunner", dtype=str(state.dtype),
               prompt_tokens=len(ids), new_tokens=a.equiv_new_tokens)
    common = dict(vocab_size=pair.vocab_size, temperature=0.0, max_new_tokens=a.equiv_new_tokens, seed=a.seed,
                  eos_token_ids=pair.eos_token_ids, context_length=pair.context_length)
    greedy = {}
    tokens = {}
    for method, L in (("ar", 0), ("rsd_s", 3)):
        if method != "ar" and fast_d is None:
            continue
        f = generate(fast_t, fast_d, ids, method, L, **common)
        e = generate(eager_t, eager_d, ids, method, L, **common)
        mm = _first_mismatch(f.tokens, e.tokens)
        greedy[method] = {"L": L, "fast_tokens": len(f.tokens), "eager_tokens": len(e.tokens),
                          "identical": mm is None, "first_mismatch": mm}
        tokens[method] = f.tokens
        log(f"greedy {method}: fast vs eager " + ("identical" if mm is None else f"differ from token {mm}")
            + f" ({len(f.tokens)} tokens)")
    if "rsd_s" in tokens:  # exactness at temperature 0 inside the fast mode
        mm = _first_mismatch(tokens["ar"], tokens["rsd_s"])
        greedy["rsd_s_equals_ar_fast"] = {"identical": mm is None, "first_mismatch": mm}
    sec["greedy"] = greedy

    # logits of one tree forward, fast vs eager, on the target (and the draft)
    gen = torch.Generator().manual_seed(a.seed + 3)
    n = 16
    parents, depth, mask = random_tree(n, gen)
    tree_tokens = [ids[-1]] + torch.randint(3, pair.vocab_size, (n - 1,), generator=gen).tolist()
    diffs = {}
    for role, fr, er in (("target", fast_t, eager_t), ("draft", fast_d, eager_d)):
        if fr is None:
            continue
        lf = _tree_logits(fr, ids, tree_tokens, depth, mask)
        le = _tree_logits(er, ids, tree_tokens, depth, mask)
        finite = torch.isfinite(lf) & torch.isfinite(le)
        same_inf = bool(((~torch.isfinite(lf)) == (~torch.isfinite(le))).all())
        d = (lf - le).abs()[finite]
        max_abs = float(d.max()) if d.numel() else 0.0
        scale = float(le[finite].abs().max()) if finite.any() else 0.0
        # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding; allow a few roundings' worth of the logit range
        tol = (0.04 * max(scale, 1.0)) if state.dtype in (torch.bfloat16, torch.float16) else 1e-3 * max(scale, 1.0)
        diffs[role] = {"nodes": n, "tree_depth": max(depth), "max_abs_diff": max_abs,
                       "mean_abs_diff": float(d.mean()) if d.numel() else 0.0, "max_abs_logit": scale,
                       "tolerance": tol, "within_tolerance": max_abs <= tol and same_inf,
                       "same_infinite_entries": same_inf,
                       "argmax_agreement": float((lf.argmax(-1) == le.argmax(-1)).float().mean())}
        log(f"tree logits ({role}, {n} nodes): max |fast - eager| = {max_abs:.4g} (max |logit| {scale:.3g}, "
            f"tolerance {tol:.3g}), argmax agreement {diffs[role]['argmax_agreement']:.0%}")
    sec["tree_logits"] = diffs
    sec["note"] = ("greedy tokens may part at a near-tie in bf16 (the fast mode attends over a padded static "
                   "cache with another kernel); the logit difference is the direct check")


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}"):
    return fmt.format(x) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else "-"


def summary_lines(report: dict) -> list[str]:
    S = report["sections"]
    m = report["meta"]
    out = [f"### Engine benchmark: {m['device_name']}, torch {m['torch']}, transformers {m['transformers']}"
           + (" (QUICK: tiny shapes, not a measurement)" if m["quick"] else "")]
    out.append("")
    out.append("| section | status | seconds |")
    out.append("|---|---|---|")
    for name in SECTIONS:
        s = S.get(name, {})
        out.append(f"| {name} | {s.get('status', '-')}{' (partial)' if s.get('partial') else ''} | "
                   f"{_f(s.get('seconds'), '{:.0f}')} |")
    bw = S.get("bandwidth", {})
    if bw.get("gb_per_s"):
        out += ["", f"Copy bandwidth (read + written): {bw['gb_per_s']:.0f} GB/s"]
    ar = S.get("ar", {})
    if ar.get("results"):
        out += ["", f"AR decode, {ar.get('context')} tokens of context (goal: fast >= 70 % of floor)", "",
                "| model | floor ms | eager ms/tok | eager % floor | fast ms/tok | fast % floor | graph replay ms |",
                "|---|---|---|---|---|---|---|"]
        for r in ar["results"]:
            e, f = r.get("eager", {}), r.get("fast", {})
            out.append(f"| {r['model']} | {_f(r.get('floor_ms'))} | {_f(e.get('ms_per_token'))} | "
                       f"{_f(100 * e['fraction_of_floor'] if e.get('fraction_of_floor') else None, '{:.0f}')} | "
                       f"{_f(f.get('ms_per_token'))} | "
                       f"{_f(100 * f['fraction_of_floor'] if f.get('fraction_of_floor') else None, '{:.0f}')} | "
                       f"{_f(f.get('graph_replay_ms'))} |")
        compiled = [(r["model"], k, v) for r in ar["results"] for k, v in r.items() if k.startswith("fast+compile")]
        if compiled:
            out += ["", "| model | fast mode with torch.compile | ms/tok | % floor | graph replay ms | compile + capture s |",
                    "|---|---|---|---|---|---|"]
            for model, k, v in compiled:
                out.append(f"| {model} | {k.split(':', 1)[1]} | {_f(v.get('ms_per_token'))} | "
                           f"{_f(100 * v['fraction_of_floor'] if v.get('fraction_of_floor') else None, '{:.0f}')} | "
                           f"{_f(v.get('graph_replay_ms'))} | {_f(v.get('compile_and_capture_seconds'), '{:.0f}')} |"
                           + (f" error: {v['error'].strip().splitlines()[-1][:120]}" if v.get("error") else ""))
    tr = S.get("tree", {})
    if tr.get("results"):
        comp = f", torch.compile {tr['compile']}" if tr.get("compile") else ""
        out += ["", f"Tree forward / AR step, 7B shape, fast mode{comp} (AR step {_f(tr.get('ar_step_ms'))} ms)", "",
                "| N | bucket | ms | ratio | graph-only ratio | goal | ok |", "|---|---|---|---|---|---|---|"]
        for r in tr["results"]:
            out.append(f"| {r['nodes']} | {r['bucket']} | {_f(r['ms'])} | {_f(r['ratio'], '{:.3f}')} | "
                       f"{_f(r.get('graph_ratio'), '{:.3f}')} | {r['goal']} | {'yes' if r['meets_goal'] else 'NO'} |")
    dg = S.get("diagnostics", {})
    if dg.get("static_step_bucket1") or dg.get("host"):
        st, ea, h = dg.get("static_step_bucket1", {}), dg.get("eager_step", {}), dg.get("host", {})
        kinds = ", ".join(f"{k} {_f(v)}" for k, v in (st.get("gpu_ms_by_kind") or {}).items())
        out += ["", "Diagnostics (7B shape, one step): un-graphed static step "
                f"{st.get('gpu_kernels', '-')} kernels, {_f(st.get('gpu_kernel_ms_total'))} ms GPU ({kinds}); "
                f"eager step {ea.get('kernel_launches', '-')} launches at {_f(ea.get('launch_cpu_us_mean'), '{:.1f}')} us "
                f"host each, {_f(ea.get('wall_ms_under_profiler'))} ms wall (profiled)"]
        c = (h.get("h2d_copy") or {})
        if c:
            out.append("H2D copy us (pageable/pinned): " + ", ".join(
                f"{k} {_f(v['pageable_us'], '{:.0f}')}/{_f(v['pinned_us'], '{:.0f}')}" for k, v in c.items())
                + f"; synchronize {_f(h.get('synchronize_us'), '{:.0f}')} us; inputs packed on the host (bucket 64) "
                  f"{_f(h.get('input_pack_us_bucket64'), '{:.0f}')} us")
    ov = S.get("overhead", {})
    if ov.get("results"):
        out += ["", f"Engine overhead per block, 7B target + small draft, fast mode, L={ov.get('L')}, random "
                "weights, acceptance as the block eff. column shows (goal: outside forwards, GPU timeline, "
                "<= 10 %)", "",
                "| method | setting | ms/block | nodes/call | block eff. | overhead phase % | outside forwards, "
                "synchronized % | outside forwards, timeline % | ok |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in ov["results"]:
            ins, tl = r.get("instrumented", {}), r.get("timeline", {})
            out.append(f"| {r['method']} | {r.get('setting', '')} | {_f(r.get('ms_per_block'))} | "
                       f"{_f(r.get('mean_nodes_per_call'), '{:.1f}')} | {_f(r.get('block_efficiency'))} | "
                       f"{_f(100 * r['overhead_fraction'] if r.get('overhead_fraction') is not None else None, '{:.1f}')} | "
                       f"{_f(100 * ins['outside_forwards_fraction'] if ins.get('outside_forwards_fraction') is not None else None, '{:.1f}')} | "
                       f"{_f(100 * tl['outside_forwards_fraction'] if tl.get('outside_forwards_fraction') is not None else None, '{:.1f}')} | "
                       f"{'yes' if r.get('meets_goal') else ('NO' if 'meets_goal' in r else r.get('skipped', 'error'))} |")
    e2e = S.get("e2e", {})
    if e2e.get("ar"):
        arr = e2e["ar"]
        hf = e2e.get("hf", {})
        hf_sd = {r["L"]: r for r in hf.get("sd", []) if "tokens_per_second" in r}
        out += ["", f"End to end: {e2e.get('pair_target')} + {e2e.get('draft')} ({e2e.get('draft_type')}), "
                f"{len(e2e.get('prompts', []))} prompts, {e2e.get('max_new_tokens')} new tokens, T={e2e.get('temperature')}; "
                f"AR {_f(arr.get('tokens_per_second'), '{:.1f}')} tok/s decode, "
                f"{_f(arr.get('wall_tokens_per_second'), '{:.1f}')} wall"
                + (f"; HF AR {_f(hf['ar'].get('tokens_per_second'), '{:.1f}')} tok/s" if isinstance(hf.get("ar"), dict) else ""),
                "", "| method | L | setting | block eff. | tok/s decode | x AR | tok/s wall | x AR wall | HF SD tok/s | ours/HF |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e.get("results", []):
            h = hf_sd.get(r["L"]) if r["method"] == "sd" else None
            out.append(f"| {r['method']} | {r['L']} | {r.get('setting', '')} | {_f(r.get('block_efficiency'))} | "
                       f"{_f(r.get('tokens_per_second'), '{:.1f}')} | {_f(r.get('speedup_decode'))} | "
                       f"{_f(r.get('wall_tokens_per_second'), '{:.1f}')} | {_f(r.get('speedup_wall'))} | "
                       f"{_f(h.get('tokens_per_second'), '{:.1f}') if h else '-'} | "
                       f"{_f(h.get('ours_wall_over_hf')) if h else '-'} |")
        if hf.get("draft"):
            out.append(f"HF draft: {hf['draft']}")
    eq = S.get("equivalence", {})
    if eq.get("greedy") or eq.get("tree_logits"):
        parts = []
        for k, v in eq.get("greedy", {}).items():
            parts.append(f"{k}: {'identical' if v['identical'] else 'differs at ' + str(v['first_mismatch'])}")
        for k, v in eq.get("tree_logits", {}).items():
            parts.append(f"{k} tree logits max|diff| {v['max_abs_diff']:.3g} (tol {v['tolerance']:.3g}, "
                         f"{'ok' if v['within_tolerance'] else 'OVER'})")
        out += ["", "Fast vs eager (greedy, same seeds): " + "; ".join(parts)]
    return out


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
FUNCS = {"bandwidth": section_bandwidth, "ar": section_ar, "tree": section_tree,
         "diagnostics": section_diagnostics, "overhead": section_overhead,
         "e2e": section_e2e, "equivalence": section_equivalence}


def main(argv=None) -> int:
    global T0
    T0 = time.perf_counter()
    args = parse_args(argv)
    from rsd_bench.pair import resolve_device, resolve_dtype
    import transformers

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        if args.blas:  # which GEMM library serves the small-row matmuls of decode and tree steps
            torch.backends.cuda.preferred_blas_library(args.blas)
        if args.no_cudnn_sdp:
            torch.backends.cuda.enable_cudnn_sdp(False)
    selected = _names(args.sections)
    report = {
        "meta": {"argv": list(argv) if argv is not None else sys.argv[1:], "args": vars(args), "quick": args.quick,
                 "device": str(dev), "device_name": gpu_name(dev), "dtype": str(dtype), "torch": torch.__version__,
                 "transformers": transformers.__version__, "python": platform.python_version(),
                 "cuda": torch.version.cuda, "blas": args.blas or "default", "cudnn_sdp": not args.no_cudnn_sdp, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "sections": {},
    }
    log(f"device {dev} ({report['meta']['device_name']}), {dtype}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; sections {','.join(selected)}; out {args.out}")
    state = State(args, dev, dtype)
    # the random 7B-shaped model is kept from the ar section on and dropped after the last user
    last_model_section = [n for n in ("ar", "tree", "diagnostics", "overhead") if n in selected][-1:] or [None]
    last_model_section = last_model_section[0]
    for name in SECTIONS:
        if name not in selected:
            report["sections"][name] = {"status": "not selected"}
            continue
        sec = {"status": "ok"}
        report["sections"][name] = sec
        elapsed = time.perf_counter() - T0
        if elapsed > args.total_budget_seconds:
            sec["status"] = "skipped"
            sec["reason"] = f"total budget of {args.total_budget_seconds:.0f}s spent ({elapsed:.0f}s)"
            log(f"== {name}: skipped, total budget spent")
            write_json(args.out, report)
            continue
        log(f"== {name}")
        budget = Budget(args.budget_seconds)
        t = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.no_grad():
                FUNCS[name](state, sec, budget)
            bad = [r for r in sec.get("results", []) if isinstance(r, dict) and "error" in r]
            if bad:
                sec["status"] = "partial error"
        except Exception:
            sec["status"] = "error"
            sec["error"] = _err()
            log(f"section {name} failed:\n{sec['error']}")
        sec["seconds"] = time.perf_counter() - t
        if name == last_model_section:
            state.drop_model()  # the 7B-shaped model is not needed after this
        if name == "equivalence" or (name == "e2e" and "equivalence" not in selected):
            state.drop_pair()
        if dev.type == "cuda":
            sec["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            torch.cuda.reset_peak_memory_stats(dev)
        write_json(args.out, report)
    state.drop_model()
    state.drop_pair()
    from rsd_bench import skinny_matmul

    report["skinny_matmul_choices"] = skinny_matmul.choices()  # kernel picked per (shape, rows)
    lines = summary_lines(report)
    report["summary"] = "\n".join(lines)
    report["meta"]["seconds"] = time.perf_counter() - T0
    write_json(args.out, report)
    print("\n" + "\n".join(lines) + "\n", flush=True)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
