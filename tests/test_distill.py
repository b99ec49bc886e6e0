"""rsd_bench.distill and rsd_bench.trimmed_vocab on a tiny random Llama target (CPU, seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsd_bench import distill as D
from rsd_bench.trimmed_vocab import MARKER, TrimmedVocabLM, load_draft, load_trimmed, save_trimmed

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the a an of to in and is was for on with as by at from that this it he she they we you i "
    "be are were has have had not but or if so what how why when where who which translate following "
    "german text english reply translation only summarize article one sentence explain write short "
    "poem about sea night three tips give me list five animals rain water city park news day year "
    "time people new good first last long great little own other old right big high different small "
    "large next early young important few public bad same able . , ! ? : ' \" - ( ) der die das und "
    "ist nicht ein eine zu mit von sich auf für im den dem es sie wir ich"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    return fast


def tiny_target(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peakier than the default init, so the distribution is not ~uniform
        model.lm_head.weight.mul_(40.0)
    return model


TINY = dict(num_samples=24, gen_tokens=8, gen_batch_size=8, layers=1, hidden=32, heads=2, intermediate=64,
            vocab_top=40, steps=6, batch_size=4, lr=3e-3, save_every=3, log_every=2, eval_prompts=3,
            eval_batch_size=4, skip_first=200, max_prompt_tokens=400, device="cpu", progress=False, seed=0)


@pytest.fixture(scope="module")
def tiny_pair():
    tok = tiny_tokenizer()
    return tiny_target(len(tok)), tok


@pytest.fixture(scope="module")
def distilled(tiny_pair, tmp_path_factory):
    model, tok = tiny_pair
    out = tmp_path_factory.mktemp("draft")
    metrics = D.distill(model, out, tokenizer=tok, **TINY)
    return out, metrics, model, tok


def test_distill_writes_a_loadable_trimmed_draft(distilled):
    out, metrics, target, tok = distilled
    assert (out / MARKER).is_file() and (out / "metrics.json").is_file() and (out / "README.md").is_file()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["steps"] == TINY["steps"] and on_disk["final_loss"] is not None
    assert set(on_disk["acceptance"]) >= {"general", "all"}
    for style, acc in on_disk["acceptance"].items():
        assert 0.0 <= acc <= 1.0, style
    assert on_disk["vocab"]["kept"] == TINY["vocab_top"] and on_disk["vocab"]["full"] == len(tok)
    assert on_disk["draft_params"] > 0 and on_disk["target_params"] > 0
    readme = (out / "README.md").read_text()
    assert "acceptance" in readme and "CC BY-SA 3.0" in readme

    draft = load_draft(str(out))
    assert isinstance(draft, TrimmedVocabLM)
    assert draft.config.vocab_size == len(tok) == target.config.vocab_size
    assert draft.vocab_size == len(tok)
    ids = torch.tensor([[1, 5, 9, 17, 0, 60, 2]])
    with torch.no_grad():
        logits = draft(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    kept = draft.out_ids
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(logits[..., outside]).all()
    assert torch.isfinite(logits[..., kept]).all()
    probs = torch.softmax(logits.float(), -1)
    assert torch.allclose(probs.sum(-1), torch.ones(1, ids.shape[1]))
    assert (probs[..., outside] == 0).all()
    # special tokens are always kept
    assert {1, 2, 3}.issubset(set(kept.tolist()))


def test_trimmed_forward_matches_manual_computation(distilled):
    out, _, _, tok = distilled
    draft = load_draft(str(out))
    ids = torch.tensor([[1, 7, 8, 0, 33, 2, 50]])
    with torch.no_grad():
        got = draft(input_ids=ids).logits
        rows = torch.tensor([int((draft.out_ids == t).nonzero()[0]) if (draft.out_ids == t).any()
                             else draft.kept_vocab_size for t in ids[0].tolist()]).view(1, -1)
        small = draft.inner(input_ids=rows).logits
    manual = torch.full_like(got, float("-inf"))
    for r, t in enumerate(draft.out_ids.tolist()):
        manual[..., t] = small[..., r]
    assert torch.equal(got, manual)
    # kwargs (the KV cache) pass through: incremental decoding equals the full forward
    from transformers import DynamicCache

    kw = D._cache_kwarg(draft.inner)
    cache = DynamicCache()
    with torch.no_grad():
        a = draft(input_ids=ids[:, :4], use_cache=True, **{kw: cache}).logits
        b = draft(input_ids=ids[:, 4:], position_ids=torch.arange(4, 7).view(1, -1), use_cache=True,
                  **{kw: cache}).logits
    inc = torch.cat([a, b], 1)
    fin = torch.isfinite(got)
    assert torch.allclose(inc[fin], got[fin], atol=1e-5)
    assert torch.equal(torch.isfinite(inc), fin)


def test_save_load_roundtrip_and_num_parameters(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    kept = torch.tensor([4, 0, 9, 2])
    cfg = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(1)
    m = TrimmedVocabLM(LlamaForCausalLM(cfg).eval(), kept, 12)
    n_real = sum(p.numel() for p in {id(p): p for p in m.inner.parameters()}.values())
    assert m.num_parameters() == n_real  # tied head counted once, maps are buffers
    save_trimmed(m, tmp_path / "d")
    m2 = load_trimmed(tmp_path / "d")
    assert torch.equal(m2.out_ids, m.out_ids) and m2.full_vocab_size == 12
    ids = torch.tensor([[0, 3, 4, 11, 9]])
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, m2(input_ids=ids).logits)
    # a plain HF dir loads through load_draft as well
    plain = tmp_path / "plain"
    m.inner.save_pretrained(str(plain))
    assert not isinstance(load_draft(str(plain)), TrimmedVocabLM)


def test_loss_goes_down_on_a_fixed_batch(tiny_pair):
    target, tok = tiny_pair
    V = target.config.vocab_size
    cfg = D.DistillConfig(layers=1, hidden=32, heads=2, intermediate=64, vocab_top=30, seed=0)
    kept = torch.arange(0, V, 3)[:30].sort().values
    for loss_name in ("kl", "tvd"):
        draft, _ = D.build_draft(cfg, V, kept, target)
        opt = torch.optim.AdamW(draft.inner.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (4, 12), generator=g)
        with torch.no_grad():
            t_logits = target(input_ids=ids).logits.reshape(-1, V)
        losses = []
        for _ in range(25):
            d_logits = draft.inner(input_ids=draft.map_inputs(ids)).logits.reshape(-1, len(kept) + 1)[:, : len(kept)]
            loss, st = D.distill_loss(t_logits, d_logits, kept, loss_name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            assert 0.0 <= st["accept"] <= st["kept_mass"] + 1e-6
        # tvd cannot go below the target mass outside the kept set: compare with the achievable gap
        floor = 1.0 - st["kept_mass"] if loss_name == "tvd" else 0.0
        assert losses[-1] - floor < 0.7 * (losses[0] - floor), (loss_name, losses)


def test_distill_loss_definitions():
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    d = torch.tensor([[0.5, 0.0]])
    kept = torch.tensor([0, 2])
    T = torch.softmax(t, -1)[0]
    Dp = torch.softmax(d, -1)[0]
    tk = T[kept] / T[kept].sum()
    kl, st = D.distill_loss(t, d, kept, "kl")
    assert torch.allclose(kl, (tk * (tk.log() - Dp.log())).sum())
    tvd, _ = D.distill_loss(t, d, kept, "tvd")
    acc = torch.minimum(T[kept], Dp).sum()
    assert torch.allclose(tvd, 1 - acc)
    assert st["kept_mass"] == pytest.approx(float(T[kept].sum()))
    assert st["accept"] == pytest.approx(float(acc))


def test_prompts_skip_the_evaluated_records(tmp_path):
    (tmp_path / "wmt18-de-en").mkdir()
    (tmp_path / "wmt18-de-en" / "newstest2018.de").write_text("".join(f"satz {i}\n" for i in range(30)))
    (tmp_path / "xsum").mkdir()
    (tmp_path / "xsum" / "test_1000.jsonl").write_text(
        "".join(json.dumps({"document": f"doc {i} " + "w " * 500, "summary": "s", "id": str(i)}) + "\n" for i in range(30)))
    (tmp_path / "dolly").mkdir()
    (tmp_path / "dolly" / "dolly15k_head.jsonl").write_text(
        "".join(json.dumps({"instruction": f"q{i}", "context": "c" if i % 2 else "", "response": "r",
                            "category": "x"}) + "\n" for i in range(30)))
    texts = D.prompt_texts(tmp_path, skip_first=10, eval_prompts=5, xsum_words=300)
    wmt = texts["wmt"]
    assert len(wmt["train"]) == 15 and len(wmt["eval"]) == 5
    assert wmt["train"][0].endswith("satz 10") and wmt["eval"][-1].endswith("satz 29")
    assert wmt["train"][0].startswith("Translate the following German text to English.")
    assert len(texts["xsum"]["train"][0].split("\n\n", 1)[1].split()) == 300
    assert texts["dolly"]["train"][1] == "q11\n\nContext: c" and texts["dolly"]["train"][0] == "q10"
    assert not set(texts["general"]["train"]) & set(texts["general"]["eval"])


def test_sampling_is_seeded_and_stops_at_eos(tiny_pair):
    target, tok = tiny_pair
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    a = D.sample_continuations(target, prompts, 10, 2, {2}, 3, seed=5)
    b = D.sample_continuations(target, prompts, 10, 2, {2}, 3, seed=5)
    assert a == b
    for c in a:
        assert 1 <= len(c) <= 10
        assert 2 not in c[:-1]  # an eos ends the continuation (and is kept)
    assert any(len(c) == 10 or c[-1] == 2 for c in a)


def test_cli_help():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "distill_draft.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ("--vocab-top", "--steps", "--loss", "--data-dir", "--skip-first", "--device"):
        assert opt in r.stdout


def test_cached_teacher_labels_equal_a_fresh_target_forward(tiny_pair):
    """The labels kept at sampling time are the target's log-probs at those positions (what the
    online path recomputes), so the cheaper training loop trains on the same targets."""
    target, tok = tiny_pair
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    teacher = []
    conts = D.sample_continuations(target, prompts, 6, 2, {2}, 3, seed=1, teacher=teacher)
    head = target.lm_head.weight.float()
    seqs = [(p + c, len(p)) for p, c in zip(prompts, conts)]
    ids, w = D._make_batch(seqs, list(range(len(seqs))), 3, 0.0, "cpu")
    with torch.no_grad():
        online = torch.log_softmax(D._selected_logits(target, ids, w > 0).float(), -1)
        h = torch.cat([t[0] for t in teacher])
        lse = torch.cat([t[1] for t in teacher])
        cached = h @ head.T - lse[:, None]
    assert [t[0].shape[0] for t in teacher] == [len(c) for c in conts]
    assert cached.shape == online.shape
    assert torch.allclose(cached, online, atol=1e-4), (cached - online).abs().max()


def test_init_layers_copies_the_target(tiny_pair):
    """A draft with all the target's layers, its full MLP and vocabulary IS the target."""
    target, tok = tiny_pair
    V = target.config.vocab_size
    cfg = D.DistillConfig(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, vocab_top=0,
                          tie_embeddings=False, init_layers="0,-1", seed=0)
    draft, copied = D.build_draft(cfg, V, None, target)
    assert copied
    ids = torch.tensor([[1, 5, 9, 17, 0, 60, 2]])
    with torch.no_grad():
        assert torch.allclose(draft(input_ids=ids).logits, target(input_ids=ids).logits, atol=1e-5)
    # a narrower MLP keeps a subset of the target's channels
    cfg_narrow = D.DistillConfig(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=32, vocab_top=0,
                                 tie_embeddings=False, init_layers="1", seed=0)
    narrow, _ = D.build_draft(cfg_narrow, V, None, target)
    rows = narrow.model.layers[0].mlp.up_proj.weight
    src = target.model.layers[1].mlp.up_proj.weight
    assert all(any(torch.equal(r, s) for s in src) for r in rows)
    with pytest.raises(ValueError, match="hidden_size"):
        D.build_draft(D.DistillConfig(layers=1, hidden=64, heads=4, init_layers="0"), V, None, target)


def test_time_budget_refit_grows_and_shrinks_within_the_request():
    fit = D.steps_that_fit
    assert fit(13, 20000, 60.0, 0.133) == 13 + 451  # slow probe: cut to what fits
    assert fit(113, 20000, 300.0, 0.05) == 113 + 6000  # faster steady state: grow again
    assert fit(113, 1000, 300.0, 0.05) == 1000  # never past the requested count
    assert fit(500, 20000, -5.0, 0.05) == 500  # over budget: stop at the steps done
    assert fit(500, 400, 10.0, 0.05) == 500  # never fewer than done


def test_time_budget_in_a_run(tiny_pair, tmp_path):
    """The budget path of the training loop: an impossible budget stops at the probe (step 13, the
    evaluation reserve alone exceeds it); an ample one keeps the requested steps through a refit."""
    model, tok = tiny_pair
    cfg = {**TINY, "steps": 120, "save_every": 1000, "log_every": 1000}
    tight = D.distill(model, tmp_path / "tight", tokenizer=tok, **{**cfg, "time_budget": 1e-3})
    assert tight["steps"] == 13 and "-> 13" in tight["time_budget_note"]
    ample = D.distill(model, tmp_path / "ample", tokenizer=tok, **{**cfg, "time_budget": 1e6})
    assert ample["steps"] == 120 and ample["time_budget_note"] is None
