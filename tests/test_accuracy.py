"""BLEU / ROUGE-2 / ROUGE-L on a shared 0-100 scale, against hand-computed values."""

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from rsd_bench.accuracy import METRICS, canonical_metric, corpus_score, sentence_score


@pytest.mark.parametrize("metric", METRICS)
def test_identical_is_100(metric):
    s = "the quick brown fox jumps over the lazy dog"
    assert sentence_score(metric, s, s) == pytest.approx(100.0)
    assert corpus_score(metric, [s, "a cat sat on a mat"], [s, "a cat sat on a mat"]) == pytest.approx(100.0)


@pytest.mark.parametrize("metric", METRICS)
def test_disjoint_and_empty_are_0(metric):
    assert sentence_score(metric, "alpha beta gamma delta", "one two three four") == 0.0
    assert sentence_score(metric, "", "one two three four") == 0.0
    assert sentence_score(metric, "   ", "one two three four") == 0.0
    assert corpus_score(metric, ["", ""], ["one two", "three four"]) == 0.0


def test_rouge2_by_hand():
    # prediction "the cat sat on the mat": bigrams {the cat, cat sat, sat on, on the, the mat} (5)
    # reference  "the cat lay on the mat": bigrams {the cat, cat lay, lay on, on the, the mat} (5)
    # overlap 3 -> P = 3/5, R = 3/5, F = 0.6 -> 60
    assert sentence_score("rouge2", "the cat sat on the mat", "the cat lay on the mat") == pytest.approx(60.0)
    # prediction "the cat sat on the mat" (5 bigrams) vs reference "the cat sat" (2 bigrams)
    # overlap 2 -> P = 2/5, R = 2/2 = 1, F = 2PR/(P+R) = 0.8/1.4 = 4/7 -> 57.142857
    assert sentence_score("rouge2", "the cat sat on the mat", "the cat sat") == pytest.approx(400 / 7)


def test_rougeL_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5 of 6 tokens
    # P = R = 5/6 -> F = 5/6 -> 83.33
    assert sentence_score("rougeL", "the cat sat on the mat", "the cat lay on the mat") == pytest.approx(500 / 6)


def test_rouge_uses_stemmer():
    # "cats"/"cat" and "running"/"run" stem to the same tokens
    assert sentence_score("rouge2", "cats running", "cat run") == pytest.approx(100.0)


@pytest.mark.parametrize("metric", ["rouge2", "rougeL"])
def test_corpus_rouge_is_mean_of_sentences(metric):
    preds = ["the cat sat on the mat", "a dog barked loudly at night", "", "hello there"]
    refs = ["the cat lay on the mat", "the dog barked at night", "something", "general kenobi"]
    mean = sum(sentence_score(metric, p, r) for p, r in zip(preds, refs)) / len(preds)
    assert corpus_score(metric, preds, refs) == pytest.approx(mean)
    assert 0 < mean < 100


def test_corpus_bleu_matches_sacrebleu():
    import sacrebleu

    preds = ["the cat sat on the mat today", "a dog barked loudly at night"]
    refs = ["the cat lay on the mat today", "the dog barked at night"]
    want = sacrebleu.corpus_bleu(preds, [refs]).score
    assert corpus_score("bleu", preds, refs) == pytest.approx(want)
    assert 0 < want < 100


def test_metric_names():
    assert canonical_metric("ROUGE-L") == "rougeL" and canonical_metric("rouge_2") == "rouge2"
    with pytest.raises(ValueError) as e:
        sentence_score("meteor", "a", "a")
    assert all(m in str(e.value) for m in METRICS)
    with pytest.raises(ValueError):
        corpus_score("chrf", ["a"], ["a"])


def test_corpus_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_score("bleu", ["a", "b"], ["a"])
    assert math.isnan(corpus_score("rouge2", [], []))
