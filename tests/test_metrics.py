"""SNI metrics (evaluate.py) against independent references.

- rouge_l is compared with `rouge_score`'s RougeScorer(['rougeL'], use_stemmer=True) called directly, exactly as
  the official SNI / Tk-Instruct / TAGI compute_metrics.py calls it (max over references).
- exact_match is compared with a reference written here from the official definition: lowercase, delete the ASCII
  punctuation characters of `string.punctuation`, collapse runs of whitespace, keep articles; max over references.
Both on a seeded stream of 1,500 awkward (prediction, references) pairs, plus hand-computed answers.
"""
import random
import re
import string

import pytest

pytest.importorskip("rouge_score")
from rouge_score import rouge_scorer  # noqa: E402

from evaluate import exact_match, rouge_l, sni_scores  # noqa: E402

N_PAIRS = 1500

WORDS = (
    "the a an cat cats sat sitting on mat mats dog dogs ran run runs running runner jumped jumps jumping "
    "generalization generalize general caresses ponies happily happiness is was be been being Paris London "
    "yes no true false positive negative neutral answer question title summary 42 3.14 1,000 2024 007 x y z "
    "I i You THE Cat CAT don't it's e.g. U.S.A. well-known state-of-the-art"
).split()
UNICODE_WORDS = [
    "café", "naïve", "résumé", "Ünïcödé", "straße", "Straße", "ﬁle", "İstanbul", "\u212a", "Ωmega", "中文",
    "東京タワー", "한국어", "русский", "عربى", "😀", "ok👍", "e\u0301", "ǅ", "ﬀ",
]
PUNCT = ["!", "?", ".", ",", "...", "—", "–", "«", "»", "¿", "¡", "'", '"', "(", ")", "[", "]", "{", "}", "#", "$",
         "%", "&", "*", "+", "-", "/", ":", ";", "<", "=", ">", "@", "\\", "^", "_", "`", "|", "~", "“", "”", "’"]
SPACES = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x0b", "\x1f", "\u2028"]
SPECIAL = ["", " ", "   ", "\n\t", ".", "?!", "...", "—", "中文", "a", "the", "0", "00", "Yes", "yes.", " YES "]


def _random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.08:
        return rng.choice(SPECIAL)
    if kind < 0.12:  # punctuation only
        return "".join(rng.choice(PUNCT + SPACES) for _ in range(rng.randint(1, 6)))
    pieces = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        piece = rng.choice(UNICODE_WORDS) if r < 0.15 else rng.choice(PUNCT) if r < 0.3 else rng.choice(WORDS)
        if rng.random() < 0.1:
            piece = piece.upper() if rng.random() < 0.5 else piece.capitalize()
        pieces.append(piece)
        pieces.append(rng.choice(SPACES) if rng.random() < 0.85 else "")  # sometimes glue pieces together
    text = "".join(pieces)
    if rng.random() < 0.2:
        text = rng.choice(SPACES) + text + rng.choice(SPACES)
    return text


def _near_duplicate(rng: random.Random, text: str) -> str:
    """A small edit: case, punctuation, whitespace, one dropped/added/swapped word, or a stemming variant."""
    edit = rng.randrange(7)
    words = text.split()
    if edit == 0:
        return text.upper() if rng.random() < 0.5 else text.lower()
    if edit == 1:
        return text + rng.choice(PUNCT)
    if edit == 2:
        return rng.choice(SPACES).join(words)
    if edit == 3 and words:
        del words[rng.randrange(len(words))]
    elif edit == 4:
        words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
    elif edit == 5 and len(words) > 1:
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    elif edit == 6:
        swaps = {"run": "running", "runs": "run", "cats": "cat", "jumped": "jumps", "ponies": "pony",
                 "generalization": "generalize", "sitting": "sit", "happily": "happy"}
        words = [swaps.get(w, w) for w in words]
    return " ".join(words)


def _pairs(n: int, seed: int = 1234) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        refs = [_random_text(rng) for _ in range(rng.choice([1, 1, 1, 2, 3, 5]))]
        r = rng.random()
        if r < 0.35:
            pred = _near_duplicate(rng, rng.choice(refs))
        elif r < 0.45:
            pred = rng.choice(refs)  # verbatim copy
        else:
            pred = _random_text(rng)
        pairs.append((pred, refs))
    return pairs


PAIRS = _pairs(N_PAIRS)

# ---- independent references ------------------------------------------------------------------------------------
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def reference_rouge_l(prediction: str, references: list[str]) -> float:
    return max(_SCORER.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


def reference_exact_match(prediction: str, references: list[str]) -> float:
    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", s.lower().translate(_PUNCT_TABLE)).strip()
    return 1.0 if norm(prediction) in {norm(r) for r in references} else 0.0


# ---- randomized parity -----------------------------------------------------------------------------------------
def test_generator_is_varied():
    """Guard against a degenerate generator: the stream must exercise both outcomes of both metrics."""
    em = [reference_exact_match(p, r) for p, r in PAIRS]
    rl = [reference_rouge_l(p, r) for p, r in PAIRS]
    assert len(PAIRS) >= 1000
    assert 50 < sum(em) < len(PAIRS) - 50
    assert sum(x == 0.0 for x in rl) > 50 and sum(x == 1.0 for x in rl) > 50 and sum(0 < x < 1 for x in rl) > 200
    assert any(len(r) > 1 for _, r in PAIRS) and any(p == "" for p, _ in PAIRS)


def test_rouge_l_matches_rouge_score():
    mismatches = [(p, r) for p, r in PAIRS if rouge_l(p, r) != reference_rouge_l(p, r)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]!r}"


def test_exact_match_matches_official_definition():
    mismatches = [(p, r) for p, r in PAIRS if exact_match(p, r) != reference_exact_match(p, r)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]!r}"


def test_ranges_and_types():
    for p, r in PAIRS[:300]:
        assert isinstance(rouge_l(p, r), float) and 0.0 <= rouge_l(p, r) <= 1.0
        assert exact_match(p, r) in (0.0, 1.0)


def test_sni_scores_matches_official_aggregation():
    preds = [p for p, _ in PAIRS]
    refs = [r for _, r in PAIRS]
    rouge_sum = em_sum = 0  # the official loop: running sums, then 100 * sum / n, rounded to 4 decimals
    for p, r in PAIRS:
        rouge_sum += reference_rouge_l(p, r)
        em_sum += reference_exact_match(p, r)
    expected = {"rougeL": round(100.0 * rouge_sum / len(PAIRS), 4),
                "exact_match": round(100.0 * em_sum / len(PAIRS), 4)}
    assert sni_scores(preds, refs) == expected


# ---- hand-computed answers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, references, expected", [
    # LCS 3, precision 3/3, recall 3/6: F1 = 2 * 1 * 0.5 / 1.5
    ("the cat sat", ["the cat sat on the mat"], 2 * 1.0 * 0.5 / 1.5),
    ("the cat sat", "the cat sat on the mat", 2 * 1.0 * 0.5 / 1.5),  # a bare string is one reference
    ("The CAT, sat!", ["the cat sat"], 1.0),  # case and punctuation are not tokens
    ("running dogs", ["runs dog"], 1.0),  # Porter stems: running/runs -> run, dogs -> dog
    ("cats", ["cat"], 1.0),  # 'cats' (4 chars) is stemmed to 'cat'
    ("was", ["wa"], 0.0),  # words of <= 3 characters are never stemmed
    ("café", ["caf"], 1.0),  # 'é' is a separator: 'café' -> ['caf']
    ("中文", ["中文"], 0.0),  # CJK leaves no tokens at all, and no tokens score 0
    ("", [""], 0.0),
    ("a b c d", ["d c b a"], 0.25),  # LCS 1 of 4 both ways
    ("a b c d", ["x", "a b", "d c b a"], 2 * 0.5 * 1.0 / 1.5),  # max over references: 'a b' gives P 2/4, R 2/2
])
def test_rouge_l_known_values(prediction, references, expected):
    assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction, references, expected", [
    ("The answer.", ["the answer"], 1.0),
    ("the answer", ["answer"], 0.0),  # articles are kept (unlike SQuAD)
    ("  Yes\t!", ["yes"], 1.0),
    ("U.S.A.", ["usa"], 1.0),
    ("don't", ["dont"], 1.0),
    ("state-of-the-art", ["stateoftheart"], 1.0),  # punctuation is deleted, not turned into a space
    ("a b", ["a  b", "c"], 1.0),
    ("", [""], 1.0),  # unlike ROUGE-L, two empty strings match
    ("?!", [""], 1.0),
    ("café", ["cafe"], 0.0),  # no accent folding
    ("¿Qué?", ["qué"], 0.0),  # '¿' is not ASCII punctuation
    ("中文", ["中文。"], 0.0),
    ("x", ["y", "z", "X."], 1.0),
    ("x", "X", 1.0),
])
def test_exact_match_known_values(prediction, references, expected):
    assert exact_match(prediction, references) == expected


def test_sni_scores_small_example():
    scores = sni_scores(["the cat sat", "yes", "no"], [["the cat sat on the mat"], ["Yes."], ["maybe", "nope"]])
    assert scores == {"rougeL": round(100.0 * (2 / 3 + 1.0 + 0.0) / 3, 4), "exact_match": round(100.0 / 3, 4)}
    assert scores["exact_match"] == 33.3333


def test_errors():
    with pytest.raises(ValueError):
        rouge_l("x", [])
    with pytest.raises(ValueError):
        exact_match("x", [])
    with pytest.raises(ValueError):
        sni_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        sni_scores([], [])
