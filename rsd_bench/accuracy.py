"""Task accuracy of generated text: BLEU (sacrebleu) and ROUGE-2 / ROUGE-L F-measure (rouge_score).

All metrics are on a 0-100 scale: BLEU is sacrebleu's score as is; ROUGE F-measures are
multiplied by 100. Corpus BLEU is sacrebleu's corpus BLEU (n-gram statistics pooled over the
corpus, default 13a tokenization, no smoothing); sentence BLEU is sacrebleu's sentence BLEU
(exp smoothing, effective order). Corpus ROUGE is the mean of the per-example F-measures.
ROUGE uses rouge_score's default tokenizer (lower-cases, keeps [a-z0-9] tokens) with the Porter
stemmer, i.e. it is meant for English output.

The RSD paper does not say which ROUGE variant it reports (F vs recall, stemming, rougeLsum vs
rougeL); these are defaults, not a reproduction of its numbers.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = ["METRICS", "sentence_score", "corpus_score", "canonical_metric"]

METRICS = ("bleu", "rouge2", "rougeL")

_ALIASES = {"bleu": "bleu", "rouge2": "rouge2", "rougel": "rougeL"}


def canonical_metric(metric: str) -> str:
    """Map a metric name to one of METRICS (case, '-' and '_' ignored: 'ROUGE-L' -> 'rougeL')."""
    key = str(metric).lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return _ALIASES[key]


@lru_cache(maxsize=None)
def _rouge_scorer(rouge_type: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)


@lru_cache(maxsize=None)
def _bleu(sentence: bool):
    from sacrebleu.metrics import BLEU

    # sentence_bleu's defaults: exp smoothing + effective order (else short sentences score 0)
    return BLEU(effective_order=True) if sentence else BLEU()


def _rouge_f(rouge_type: str, prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    score = _rouge_scorer(rouge_type).score(reference, prediction)  # (target, prediction)
    return 100.0 * score[rouge_type].fmeasure


def sentence_score(metric: str, prediction: str, reference: str) -> float:
    """Score one prediction against one reference, 0-100."""
    metric = canonical_metric(metric)
    prediction = prediction or ""
    reference = reference or ""
    if metric == "bleu":
        if not prediction.strip():
            return 0.0
        return float(_bleu(True).sentence_score(prediction, [reference]).score)
    return _rouge_f(metric, prediction, reference)


def corpus_score(metric: str, predictions: list[str], references: list[str]) -> float:
    """Corpus-level score, 0-100: corpus BLEU, or the mean per-example ROUGE F.

    Empty predictions count as score 0 (for BLEU they contribute no matching n-grams and their
    reference length goes into the brevity penalty). An empty list gives NaN.
    """
    metric = canonical_metric(metric)
    predictions = [p or "" for p in predictions]
    references = [r or "" for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return math.nan
    if metric == "bleu":
        if not any(p.strip() for p in predictions):
            return 0.0
        return float(_bleu(False).corpus_score(predictions, [references]).score)
    return sum(_rouge_f(metric, p, r) for p, r in zip(predictions, references)) / len(predictions)
