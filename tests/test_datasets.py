"""Loaders (local parallel text / jsonl, embedded samples, hub errors) and prompt building."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rsd_bench.datasets import DatasetConfig, Example, build_prompt, load_examples, render_prompt

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSD_BENCH_DATA") or REPO.parent / "shared" / "data")
# asking for more examples than a small file has warns; that is tested once, below
pytestmark = pytest.mark.filterwarnings("ignore:.*only has.*:UserWarning")

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} not present")


def compose(name: str, **overrides) -> DatasetConfig:
    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig),
        OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml"),
        OmegaConf.create(overrides),
    )
    return OmegaConf.to_object(cfg)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


# ---------------------------------------------------------------------------------------------
# YAML option files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,metric", [("wmt", "bleu"), ("xsum", "rouge2"), ("dolly", "rougeL")])
def test_yaml_composes_with_schema(name, metric):
    cfg = compose(name)
    assert isinstance(cfg, DatasetConfig)
    assert cfg.name == name and cfg.metric == metric and cfg.source == "hub"
    assert cfg.path is None and cfg.embedded_file == f"{name}_sample.jsonl"
    assert "{input}" in cfg.prompt_template and "{input}" in cfg.chat_prompt
    assert cfg.num_examples == 50 and cfg.offset == 0


def test_yaml_env_interpolation_for_path(monkeypatch):
    monkeypatch.setenv("RSD_BENCH_DATA", "/some/data")
    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig),
        OmegaConf.load(REPO / "conf" / "dataset" / "xsum.yaml"),
        OmegaConf.from_dotlist(["path=${oc.env:RSD_BENCH_DATA}/xsum/test_1000.jsonl"]),
    )
    assert cfg.path == "/some/data/xsum/test_1000.jsonl"


# ---------------------------------------------------------------------------------------------
# real local files (../shared/data or $RSD_BENCH_DATA)
# ---------------------------------------------------------------------------------------------
@needs_data
def test_wmt_parallel_text():
    prefix = DATA / "wmt18-de-en" / "newstest2018"
    de, en = read_lines(Path(f"{prefix}.de")), read_lines(Path(f"{prefix}.en"))
    cfg = compose("wmt", path=str(prefix), num_examples=10_000)
    ex = load_examples(cfg)  # the dotted hub fields are ignored for parallel text
    assert len(ex) == 2998
    assert ex[0].input == de[0] and ex[0].reference == en[0]
    assert ex[-1].input == de[2997] and ex[-1].reference == en[2997]
    assert ex[0].id == "wmt-0" and ex[0].context == ""

    sub = load_examples(compose("wmt", path=str(prefix), offset=5, num_examples=3))
    assert [e.id for e in sub] == ["wmt-5", "wmt-6", "wmt-7"]
    assert [e.input for e in sub] == de[5:8] and [e.reference for e in sub] == en[5:8]


@needs_data
def test_xsum_jsonl():
    path = DATA / "xsum" / "test_1000.jsonl"
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ex = load_examples(compose("xsum", path=str(path), offset=10, num_examples=4))
    assert len(ex) == 4
    for e, r in zip(ex, recs[10:14]):
        assert e.input == r["document"] and e.reference == r["summary"] and e.id == str(r["id"])
    assert len(load_examples(compose("xsum", path=str(path), num_examples=5000))) == len(recs) == 1000


@needs_data
def test_dolly_jsonl_with_context():
    path = DATA / "dolly" / "dolly15k_head.jsonl"
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ex = load_examples(compose("dolly", path=str(path), num_examples=20))
    assert len(ex) == 20
    for i, (e, r) in enumerate(zip(ex, recs)):
        assert (e.input, e.context, e.reference) == (r["instruction"], r["context"], r["response"])
        assert e.id == f"dolly-{i}"
    assert any(e.context for e in ex) and any(not e.context for e in ex)
    tail = load_examples(compose("dolly", path=str(path), offset=len(recs) - 2, num_examples=50))
    assert [e.id for e in tail] == [f"dolly-{len(recs) - 2}", f"dolly-{len(recs) - 1}"]


# ---------------------------------------------------------------------------------------------
# embedded samples
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wmt", "xsum", "dolly"])
def test_embedded_samples(name):
    ex = load_examples(compose(name, source="embedded", num_examples=1000))
    assert len(ex) >= 15
    assert all(e.input.strip() and e.reference.strip() for e in ex)
    assert len({e.id for e in ex}) == len(ex)
    if name == "dolly":
        assert any(e.context for e in ex) and any(not e.context for e in ex)
    sub = load_examples(compose(name, source="embedded", offset=2, num_examples=3))
    assert [e.id for e in sub] == [e.id for e in ex[2:5]]


def test_embedded_fewer_than_asked_warns():
    with pytest.warns(UserWarning, match="only has"):
        ex = load_examples(compose("wmt", source="embedded", offset=0, num_examples=50))
    assert 15 <= len(ex) < 50


def test_path_wins_over_source(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"document": "doc", "summary": "sum"}) + "\n")
    ex = load_examples(compose("xsum", source="embedded", path=str(f)))
    assert [(e.id, e.input, e.reference) for e in ex] == [("xsum-0", "doc", "sum")]


def test_dotted_fields_nested_and_flat(tmp_path):
    f = tmp_path / "t.jsonl"
    recs = [{"translation": {"de": "Hallo", "en": "Hello"}}, {"translation": {"de": "Welt", "en": "World"}}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ex = load_examples(compose("wmt", path=str(f)))
    assert [(e.input, e.reference) for e in ex] == [("Hallo", "Hello"), ("Welt", "World")]
    # flat records: "translation.de" falls back to "de" (the layout of the embedded WMT sample)
    g = tmp_path / "flat.jsonl"
    g.write_text(json.dumps({"id": "s1", "de": "Ja", "en": "Yes"}) + "\n")
    assert [(e.id, e.input, e.reference) for e in load_examples(compose("wmt", path=str(g)))] == [("s1", "Ja", "Yes")]


# ---------------------------------------------------------------------------------------------
# errors for people
# ---------------------------------------------------------------------------------------------
def test_missing_jsonl_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        load_examples(compose("xsum", path=str(missing)))
    assert str(missing) in str(e.value) and "dataset.path=" in str(e.value)


def test_missing_parallel_prefix(tmp_path):
    prefix = tmp_path / "newstest"
    with pytest.raises(FileNotFoundError) as e:
        load_examples(compose("wmt", path=str(prefix)))
    assert f"{prefix}.de" in str(e.value) and "dataset.path=" in str(e.value)
    Path(f"{prefix}.de").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"newstest\.en"):
        load_examples(compose("wmt", path=str(prefix)))


def test_mismatched_parallel_files(tmp_path):
    prefix = tmp_path / "p"
    Path(f"{prefix}.de").write_text("eins\nzwei\ndrei\n")
    Path(f"{prefix}.en").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="3 lines.*2"):
        load_examples(compose("wmt", path=str(prefix)))


def test_missing_field_lists_fields(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a", "summary": "b", "id": 7}) + "\n")
    with pytest.raises(KeyError) as e:
        load_examples(compose("xsum", path=str(f)))
    msg = str(e.value)
    assert "'document'" in msg and "text" in msg and "summary" in msg and "id" in msg


def test_offset_past_end(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"document": "a", "summary": "b"}) + "\n")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(compose("xsum", path=str(f), offset=5))


def test_hub_failure_is_explained(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RuntimeError) as e:
        load_examples(compose("xsum"))
    msg = str(e.value)
    assert "could not fetch" in msg and "dataset.path=" in msg and "dataset.source=embedded" in msg


def test_hub_records_with_dotted_fields(monkeypatch):
    rows = [{"translation": {"de": f"de{i}", "en": f"en{i}"}} for i in range(10)]

    class FakeDS:
        column_names = ["translation"]

        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def select(self, idx):
            return FakeDS([self.rows[i] for i in idx])

        def __iter__(self):
            return iter(self.rows)

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: calls.append((a, k)) or FakeDS(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ex = load_examples(compose("wmt", offset=8, num_examples=5))
    assert calls == [(("wmt/wmt18", "de-en"), {"split": "test"})]
    assert [(e.id, e.input, e.reference) for e in ex] == [("wmt-8", "de8", "en8"), ("wmt-9", "de9", "en9")]


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(texts, chat_template=CHAT_TEMPLATE):
    """A whitespace WordLevel tokenizer over the words of `texts`, adding BOS like Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for t in texts:
        for w in t.split():
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


EX = Example(id="x", input="Der Hund schläft .", reference="The dog sleeps .")


def _vocab_texts(cfg, ex):
    return [cfg.prompt_template, cfg.chat_prompt, cfg.system_prompt or "", ex.input, ex.context,
            "user assistant system :"]


def test_build_prompt_base_vs_chat():
    cfg = compose("wmt", system_prompt="You translate .")
    tok = make_tokenizer(_vocab_texts(cfg, EX))
    base = build_prompt(EX, cfg, tok, chat=False)
    chat = build_prompt(EX, cfg, tok, chat=True)
    assert all(isinstance(t, int) for t in base + chat)
    assert base[0] == tok.bos_token_id and base.count(tok.bos_token_id) == 1
    base_text, chat_text = tok.decode(base), tok.decode(chat)
    assert "<unk>" not in base_text and "<unk>" not in chat_text
    assert EX.input in base_text and "German:" in base_text and base_text.endswith("English:")
    assert EX.input in chat_text and "Reply with the translation only." in chat_text
    assert chat_text.startswith("<s> system : You translate . </s>")
    assert chat_text.endswith("assistant :")
    assert base != chat


def test_build_prompt_no_chat_template():
    cfg = compose("wmt")
    tok = make_tokenizer(_vocab_texts(cfg, EX), chat_template=None)
    assert build_prompt(EX, cfg, tok, chat=False)  # base prompts still work
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(EX, cfg, tok, chat=True)


def test_build_prompt_system_rejected_falls_back():
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    )
    cfg = compose("wmt", system_prompt="Be brief .")
    tok = make_tokenizer(_vocab_texts(cfg, EX), chat_template=template)
    with pytest.warns(UserWarning, match="system"):
        ids = build_prompt(EX, cfg, tok, chat=True)
    text = tok.decode(ids)
    assert text.startswith("<s> user : Be brief .") and EX.input in text


def test_dolly_context_line_collapses():
    cfg = compose("dolly")
    with_ctx = Example(id="a", input="Who won?", reference="", context="Team A beat Team B.")
    no_ctx = Example(id="b", input="Who won?", reference="")
    assert render_prompt(cfg.prompt_template, with_ctx) == "Instruction: Who won?\nContext: Team A beat Team B.\nResponse:"
    assert render_prompt(cfg.prompt_template, no_ctx) == "Instruction: Who won?\nResponse:"
    assert render_prompt(cfg.chat_prompt, with_ctx) == "Who won?\n\nContext: Team A beat Team B."
    assert render_prompt(cfg.chat_prompt, no_ctx) == "Who won?"
    assert render_prompt("{input}\n{context}\nEnd", no_ctx) == "Who won?\nEnd"


def test_render_prompt_braces_in_input_and_bad_placeholder():
    ex = Example(id="a", input="f(x) = {x}", reference="")
    assert render_prompt("Q: {input}", ex) == "Q: f(x) = {x}"
    with pytest.raises(ValueError, match="placeholder"):
        render_prompt("{question}", ex)
