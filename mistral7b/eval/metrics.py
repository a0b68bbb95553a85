"""Scores of one answer: multiple-choice picks, exact match, token F1, answer extraction, majority vote."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = str.maketrans("", "", string.punctuation)


def pick(scores: list[float]) -> int:
    """Index of the best score; the first on ties (as numpy's argmax)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def multiple_choice(logliks: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """acc by summed log-likelihood, acc_norm by log-likelihood per character of the choice text
    (without the target delimiter, as lm-eval divides)."""
    norm = [ll / len(c) for ll, c in zip(logliks, choices)]
    return {"acc": float(pick(logliks) == gold), "acc_norm": float(pick(norm) == gold)}


def exact_match(prediction: str, references: list[str], *, ignore_case: bool = True, ignore_punctuation: bool = True,
                regexes_to_ignore: tuple[str, ...] = ()) -> float:
    """1.0 when the prediction equals any reference after the same normalisation (the rules of
    Hugging Face `evaluate`'s exact_match, which lm-eval uses)."""
    def norm(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_PUNCT)
        return text

    return float(any(norm(prediction) == norm(r) for r in references))


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = re.sub(r"\b(a|an|the)\b", " ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def f1(prediction: str, references: list[str]) -> float:
    """Best token-overlap F1 of the prediction against any reference (SQuAD/QuAC)."""
    def one(reference: str) -> float:
        pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
        if not pred or not ref:
            return float(pred == ref)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    return max(one(r) for r in references)


def extract_number(text: str) -> str | None:
    """GSM8K: the number after "The answer is", else the last number in the text; commas and $ dropped."""
    found = re.findall(r"[Tt]he answer is:?\s*\$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)", text) or \
        re.findall(r"-?[0-9][0-9,]*(?:\.[0-9]+)?", text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def last_boxed(text: str) -> str | None:
    """MATH: the content of the last \\boxed{...} (braces balanced), else None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def normalize_math(answer: str) -> str:
    """Forms of one LaTeX answer that differ only in notation compare equal."""
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""), ("\\%", ""), ("$", "")):
        answer = answer.replace(old, new)
    answer = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", answer)
    answer = "".join(answer.split()).rstrip(".")
    return answer[:-2] if re.fullmatch(r"-?\d+\.0", answer) else answer


def extract_bbh(text: str) -> str:
    """BBH chain of thought: what follows the last "the answer is", without the closing period."""
    found = re.findall(r"the answer is (.*)", text, flags=re.IGNORECASE)
    return (found[-1] if found else text).strip().rstrip(".").strip()


def majority(answers: list[str | None]) -> str | None:
    """The most common extracted answer (None = nothing extracted, never voted for); the earliest
    sample wins a tie, so the vote is deterministic."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)
