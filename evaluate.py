"""Evaluation for TAGI: Super-NaturalInstructions metrics with the official semantics, rank classification for P3,
and efficiency (FLOPs, latency). See DESIGN.md §9.

SNI metrics follow the official `compute_metrics.py` (natural-instructions eval/automatic/evaluation.py, copied by
Tk-Instruct and TAGI) for the default (English) track:
- ROUGE-L F1 from `rouge_score` with `use_stemmer=True`: lowercase, every run of characters outside [a-z0-9] is a
  separator (so accents and CJK vanish), Porter-stem tokens longer than 3 characters; empty token lists score 0.
- exact match after lowercasing, deleting ASCII punctuation and collapsing whitespace; articles are kept.
Both take the max over the references; `sni_scores` averages, multiplies by 100 and rounds to 4 decimals.
"""
import string

from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # the official default-track scorer
_PUNCTUATION = set(string.punctuation)  # ASCII only, as in the official normalize_answer


def _as_list(references: list[str] | str) -> list[str]:
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError("at least one reference is needed")
    return references


def rouge_l(prediction: str, references: list[str] | str) -> float:
    """ROUGE-L F1 in [0, 1], max over references."""
    scores = (_ROUGE.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in _as_list(references))
    return float(max(scores))  # rouge_score gives int 0 when either side has no tokens


def normalize_answer(text: str) -> str:
    """Official SNI normalisation: lower, drop ASCII punctuation, collapse whitespace (articles kept, unlike SQuAD)."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def exact_match(prediction: str, references: list[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_list(references)))


def sni_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"rougeL", "exact_match"}: means × 100 rounded to 4 decimals, as the official compute_metrics reports them."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} and {len(references)}")
    n = len(predictions)
    rouge = sum(rouge_l(p, r) for p, r in zip(predictions, references))
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    return {"rougeL": round(100.0 * rouge / n, 4), "exact_match": round(100.0 * em / n, 4)}
