"""Evaluation data: load examples (hub, local file or embedded sample) and build prompts.

Where examples come from (`load_examples`):

* ``path`` set (whatever ``source`` says) -> a local file.
  - ``path`` is an existing file: JSON Lines, one record per line; fields are read by name
    (``input_field``, ``reference_field``, ``context_field``).
  - otherwise ``path`` is a prefix of parallel text: ``f"{path}.{src_suffix}"`` (source) and
    ``f"{path}.{tgt_suffix}"`` (reference), one segment per line, zipped line by line (WMT's
    ``newstest2018.de`` / ``newstest2018.en``). Field names are not used for parallel text.
* ``source == "embedded"`` -> ``rsd_bench/data/<embedded_file>``, a small ORIGINAL sample shipped
  with the package (so runs and tests work offline). Every ``conf/dataset/*.yaml`` names its
  sample, so ``dataset.source=embedded`` alone switches to it.
* ``source == "hub"`` -> ``datasets.load_dataset(hub_path, hub_name, split=hub_split)``.

Field names. A dotted name such as ``"translation.de"`` reads ``record["translation"]["de"]``
(the Hugging Face WMT layout). If the record has no key ``"translation"``, the last component
(``"de"``) is looked up at top level instead; that is how the embedded WMT sample, whose records
are flat ``{"id", "de", "en"}``, is read with the same ``wmt.yaml`` fields as the hub. The XSum
and Dolly local files and embedded samples use the hub's field names.

Which examples: ``[offset, offset + num_examples)``, clipped to the data; zero examples is an
error. An example's id is the record's ``"id"`` field if it has one, else ``f"{name}-{index}"``
with ``index`` the position in the whole file / split (not in the subset).

Relative paths are resolved against the current working directory.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

__all__ = ["DatasetConfig", "Example", "load_examples", "build_prompt", "render_prompt"]


@dataclass
class DatasetConfig:
    """Hydra structured-config schema for ``conf/dataset/*.yaml`` (see module docstring)."""

    name: str = "wmt"  # wmt | xsum | dolly | anything a YAML names
    source: str = "hub"  # hub | local | embedded ; a non-null `path` means local whatever `source` says
    hub_path: str = ""  # e.g. "wmt/wmt18", "EdinburghNLP/xsum", "databricks/databricks-dolly-15k"
    hub_name: Optional[str] = None  # e.g. "de-en"
    hub_split: str = "test"
    path: Optional[str] = None  # .jsonl file, or prefix p with p.<src_suffix> and p.<tgt_suffix>
    src_suffix: str = "de"
    tgt_suffix: str = "en"
    embedded_file: str = ""  # file name under rsd_bench/data/ (package data)
    input_field: str = "input"  # jsonl / hub field holding the source text (dotted = nested)
    reference_field: str = "reference"
    context_field: Optional[str] = None  # dolly: "context"
    prompt_template: str = "{input}"  # base models: str.format with {input} and {context}
    chat_prompt: str = "{input}"  # user message for chat models; the chat template wraps it
    system_prompt: Optional[str] = None
    num_examples: int = 50
    offset: int = 0  # the evaluated subset is [offset, offset + num_examples)
    max_new_tokens: int = 128
    metric: str = "bleu"  # bleu | rouge2 | rougeL


@dataclass
class Example:
    id: str
    input: str
    reference: str
    context: str = ""


_SOURCES = ("hub", "local", "embedded")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_examples(cfg: DatasetConfig) -> list[Example]:
    """Load the examples ``[cfg.offset, cfg.offset + cfg.num_examples)`` of the configured data."""
    if cfg.offset < 0:
        raise ValueError(f"dataset.offset must be >= 0, got {cfg.offset}")
    if cfg.num_examples <= 0:
        raise ValueError(f"dataset.num_examples must be > 0, got {cfg.num_examples}")
    source = cfg.source
    if cfg.path is not None and str(cfg.path) != "":
        examples, where = _load_local(cfg)
    elif source == "local":
        raise ValueError(
            f"dataset {cfg.name!r}: source=local but no path is set; "
            f"pass dataset.path=/path/to/file.jsonl (or a parallel-text prefix)"
        )
    elif source == "embedded":
        examples, where = _load_embedded(cfg)
    elif source == "hub":
        examples, where = _load_hub(cfg)
    else:
        raise ValueError(f"dataset.source must be one of {_SOURCES}, got {source!r}")
    if not examples:
        raise ValueError(
            f"dataset {cfg.name!r}: no examples in [{cfg.offset}, {cfg.offset + cfg.num_examples}) "
            f"of {where}; lower dataset.offset"
        )
    if len(examples) < cfg.num_examples:
        warnings.warn(
            f"dataset {cfg.name!r}: asked for {cfg.num_examples} examples from offset {cfg.offset}, "
            f"but {where} only has {len(examples)} there; using those",
            stacklevel=2,
        )
    return examples


def _window(cfg: DatasetConfig, total: int) -> range:
    start = min(cfg.offset, total)
    return range(start, min(total, cfg.offset + cfg.num_examples))


def _load_local(cfg: DatasetConfig) -> tuple[list[Example], str]:
    path = os.path.expanduser(str(cfg.path))
    if os.path.isfile(path):
        return _examples_from_jsonl(cfg, _read_jsonl(path), path), path
    src, tgt = f"{path}.{cfg.src_suffix}", f"{path}.{cfg.tgt_suffix}"
    if os.path.isfile(src) and os.path.isfile(tgt):
        return _load_parallel(cfg, src, tgt), f"{src} + {tgt}"
    if os.path.isfile(src) or os.path.isfile(tgt):
        missing = tgt if os.path.isfile(src) else src
        raise FileNotFoundError(
            f"dataset {cfg.name!r}: parallel text needs both {src} and {tgt}, but {missing} does "
            f"not exist; fix dataset.path (the prefix) or dataset.src_suffix / dataset.tgt_suffix"
        )
    if path.endswith((".jsonl", ".json")):
        what = path
    else:
        what = f"{path} (nor parallel text {src} + {tgt})"
    raise FileNotFoundError(
        f"dataset {cfg.name!r}: no such file: {what}; fix it with dataset.path=/path/to/file.jsonl "
        f"(or dataset.path=PREFIX for PREFIX.{cfg.src_suffix} + PREFIX.{cfg.tgt_suffix}), or drop "
        f"the path and use dataset.source=embedded for the small bundled sample"
    )


def _read_lines(path: str) -> list[str]:
    # split on "\n" only: str.splitlines would also split on U+2028, U+0085 etc. and misalign
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _load_parallel(cfg: DatasetConfig, src: str, tgt: str) -> list[Example]:
    src_lines, tgt_lines = _read_lines(src), _read_lines(tgt)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(
            f"dataset {cfg.name!r}: parallel files differ in length: {src} has {len(src_lines)} "
            f"lines, {tgt} has {len(tgt_lines)}; they must be aligned line by line"
        )
    return [
        Example(id=f"{cfg.name}-{i}", input=src_lines[i], reference=tgt_lines[i])
        for i in _window(cfg, len(src_lines))
    ]


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); expected JSON Lines") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            records.append(rec)
    return records


def _load_embedded(cfg: DatasetConfig) -> tuple[list[Example], str]:
    if not cfg.embedded_file:
        raise ValueError(
            f"dataset {cfg.name!r}: source=embedded but dataset.embedded_file is empty; "
            f"name a file under rsd_bench/data/ (available: {', '.join(_embedded_files())})"
        )
    res = resources.files("rsd_bench") / "data" / cfg.embedded_file
    if not res.is_file():
        raise FileNotFoundError(
            f"dataset {cfg.name!r}: no embedded file rsd_bench/data/{cfg.embedded_file}; "
            f"available: {', '.join(_embedded_files()) or 'none'} (set dataset.embedded_file=...)"
        )
    with resources.as_file(res) as p:
        records = _read_jsonl(str(p))
    where = f"rsd_bench/data/{cfg.embedded_file}"
    return _examples_from_jsonl(cfg, records, where), where


def _embedded_files() -> list[str]:
    try:
        d = resources.files("rsd_bench") / "data"
        return sorted(x.name for x in d.iterdir() if x.name.endswith(".jsonl"))
    except (FileNotFoundError, NotADirectoryError, TypeError):
        return []


def _load_hub(cfg: DatasetConfig) -> tuple[list[Example], str]:
    where = f"{cfg.hub_path}" + (f" ({cfg.hub_name})" if cfg.hub_name else "") + f" split {cfg.hub_split!r}"
    if not cfg.hub_path:
        raise ValueError(
            f"dataset {cfg.name!r}: source=hub but dataset.hub_path is empty; set it, or use "
            f"dataset.path=/path/to/file.jsonl or dataset.source=embedded"
        )
    try:
        import datasets as hf_datasets  # slow import: only when the hub is used

        ds = hf_datasets.load_dataset(cfg.hub_path, cfg.hub_name, split=cfg.hub_split)
    except Exception as e:  # offline, unknown name, missing split, ...
        raise RuntimeError(
            f"dataset {cfg.name!r}: could not fetch {where} from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Without hub access, read a local copy with "
            f"dataset.path=/path/to/file.jsonl (for parallel text such as WMT: dataset.path=PREFIX "
            f"with PREFIX.{cfg.src_suffix} and PREFIX.{cfg.tgt_suffix}), or use the small bundled "
            f"sample with dataset.source=embedded"
        ) from e
    idx = _window(cfg, len(ds))
    where += f" ({len(ds)} records)"
    sub = ds.select(idx) if len(idx) else []
    records = [dict(r) for r in sub]
    return _examples_from_records(cfg, records, idx.start, where), where


def _examples_from_jsonl(cfg: DatasetConfig, records: list[dict], where: str) -> list[Example]:
    idx = _window(cfg, len(records))
    return _examples_from_records(cfg, records[idx.start : idx.stop], idx.start, f"{where} ({len(records)} records)")


def _examples_from_records(
    cfg: DatasetConfig, records: list[dict], start: int, where: str
) -> list[Example]:
    out = []
    for k, rec in enumerate(records):
        i = start + k
        inp = _get_field(rec, cfg.input_field, "input_field", cfg, where, i)
        ref = _get_field(rec, cfg.reference_field, "reference_field", cfg, where, i)
        ctx = _get_field(rec, cfg.context_field, "context_field", cfg, where, i) if cfg.context_field else ""
        rid = rec.get("id")
        out.append(
            Example(
                id=str(rid) if rid is not None and rid != "" else f"{cfg.name}-{i}",
                input=inp,
                reference=ref,
                context=ctx,
            )
        )
    return out


_MISSING = object()


def _lookup(rec: Mapping, name: str) -> Any:
    if name in rec:
        return rec[name]
    if "." in name:
        head, rest = name.split(".", 1)
        if head in rec and isinstance(rec[head], Mapping):
            return _lookup(rec[head], rest)
        if head not in rec:  # flat record: fall back to the last component ("translation.de" -> "de")
            return rec.get(name.rsplit(".", 1)[1], _MISSING)
    return _MISSING


def _describe_fields(rec: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in rec.items():
        out.append(prefix + str(k))
        if isinstance(v, Mapping):
            out.extend(_describe_fields(v, prefix + str(k) + "."))
    return out


def _get_field(rec: Mapping, name: str, key: str, cfg: DatasetConfig, where: str, index: int) -> str:
    val = _lookup(rec, name)
    if val is _MISSING:
        raise KeyError(
            f"dataset {cfg.name!r}: record {index} of {where} has no field {name!r} "
            f"(dataset.{key}); its fields are: {', '.join(_describe_fields(rec)) or '(none)'}"
        )
    if val is None:
        return ""
    if not isinstance(val, str):
        raise TypeError(
            f"dataset {cfg.name!r}: field {name!r} of record {index} of {where} is "
            f"{type(val).__name__}, expected a string (fields: {', '.join(_describe_fields(rec))})"
        )
    return val


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def render_prompt(template: str, example: Example) -> str:
    """``template.format(input=..., context=...)``, dropping ``{context}`` lines when context is empty.

    str.format has no conditionals, so when the example's context is empty (or whitespace), every
    template line that contains ``{context}`` is removed before formatting, together with a blank
    line right before it. With the Dolly template ``"Instruction: {input}\\nContext: {context}\\nResponse:"``
    an example without context becomes ``"Instruction: ...\\nResponse:"``, and the chat prompt
    ``"{input}\\n\\nContext: {context}"`` becomes just the instruction.
    """
    if not example.context.strip() and "{context}" in template:
        kept: list[str] = []
        for line in template.split("\n"):
            if "{context}" in line:
                if kept and not kept[-1].strip():  # and the blank separator line before it
                    kept.pop()
                continue
            kept.append(line)
        template = "\n".join(kept)
    try:
        return template.format(input=example.input, context=example.context)
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"prompt template {template!r} uses the placeholder {e}; only {{input}} and {{context}} "
            f"are available (write literal braces as {{{{ and }}}})"
        ) from e


def _to_id_list(out: Any) -> list[int]:
    """Normalize apply_chat_template / tokenizer output to a flat list of ints."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # tensor / ndarray
        out = out.tolist()
    out = list(out)
    if out and not isinstance(out[0], int) and (isinstance(out[0], (list, tuple)) or hasattr(out[0], "tolist")):
        if len(out) != 1:
            raise ValueError(f"expected one sequence of token ids, got a batch of {len(out)}")
        out = out[0]
        if hasattr(out, "tolist"):
            out = out.tolist()
    return [int(t) for t in out]


def build_prompt(example: Example, cfg: DatasetConfig, tokenizer, chat: bool) -> list[int]:
    """Token ids of the prompt for one example.

    Base models (``chat=False``): ``render_prompt(cfg.prompt_template, example)`` tokenized with
    the tokenizer's default special tokens (e.g. Llama's BOS). Chat models: messages
    ``[system (if cfg.system_prompt), user = render_prompt(cfg.chat_prompt, example)]`` through
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=True)``. If the chat
    template rejects a system message (some do, e.g. Gemma's), the system prompt is prepended to
    the user message instead, with a warning.
    """
    if not chat:
        text = render_prompt(cfg.prompt_template, example)
        return _to_id_list(tokenizer(text, add_special_tokens=True)["input_ids"])

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no "
            f"chat template, so a chat prompt cannot be built; use the model as a base model "
            f"(prompt_template) or load a tokenizer that has one"
        )
    user = render_prompt(cfg.chat_prompt, example)
    messages = [{"role": "user", "content": user}]
    if cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:
        if not cfg.system_prompt:
            raise
        warnings.warn(
            f"chat template rejected the system message ({type(e).__name__}: {e}); "
            f"prepending the system prompt to the user message instead",
            stacklevel=2,
        )
        merged = [{"role": "user", "content": cfg.system_prompt + "\n\n" + user}]
        out = tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=True)
    return _to_id_list(out)
