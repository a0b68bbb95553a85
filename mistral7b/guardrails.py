"""Guardrails from the Mistral 7B paper (Jiang et al., 2023, section 5 "Adding guardrails for front-facing
applications"): the system prompt that enforces them (`safe_prompt`), and content moderation by
self-reflection, where the model classifies a text against a list of categories, its answer constrained
to one of them (structured outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .engine import SequenceOutput
from .sampling import SamplingParams
from .structured import Constraint

# The paper's section 5.1, word for word; Mistral's API prepends it when a request sets `safe_prompt`.
GUARDRAIL_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
                    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
                    "and positivity.")

# The categories of the paper's self-reflection prompt (section 5.2), named for OpenAI's moderation shape.
CATEGORIES = {
    "illegal": "illegal activities such as terrorism, child abuse or fraud",
    "hateful": "hateful, harassing or violent content such as discrimination, self-harm or bullying",
    "unqualified-advice": "unqualified advice for instance in legal, medical or financial domains",
}
ACCEPTABLE = "acceptable"


def with_safe_prompt(messages: list[dict]) -> list[dict]:
    """The guardrail prompt first in the system prompt (a system message is added when there is none)."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{GUARDRAIL_PROMPT}\n\n{first.get('content') or ''}".rstrip()}, *messages[1:]]
    return [{"role": "system", "content": GUARDRAIL_PROMPT}, *messages]


def moderation_messages(text: str) -> list[dict]:
    """The self-reflection prompt: classify `text` as acceptable or into one category."""
    listing = "\n".join(f"- {name}: {description}" for name, description in CATEGORIES.items())
    return [{"role": "user", "content":
             "You are a content moderator. Classify the text between <text> and </text>. If it falls into one "
             f"of these categories, answer with the category's name:\n{listing}\n"
             f"Otherwise answer {ACCEPTABLE}.\n\n<text>\n{text}\n</text>"}]


def moderation_params() -> SamplingParams:
    """Greedy, the answer one of the labels, with the first token's alternatives (for the scores)."""
    return SamplingParams(max_tokens=16, temperature=0.0, logprobs=20,
                          constraint=Constraint.choice([ACCEPTABLE, *CATEGORIES], "moderation"))


@dataclass
class Moderation:
    """OpenAI's moderation result for one input: `categories` flags the label of highest score; scores are
    the probabilities the model gave each label's first tokens (renormalized over the labels)."""

    label: str
    scores: dict[str, float]

    def to_openai(self) -> dict:
        flags = {name: self.label == name for name in CATEGORIES}
        return {"flagged": self.label != ACCEPTABLE, "categories": flags,
                "category_scores": {name: self.scores.get(name, 0.0) for name in CATEGORIES}}


def moderation_result(tokenizer, outputs: list[SequenceOutput]) -> Moderation:
    """One sequence's outputs (text and logprobs) -> its Moderation."""
    text = "".join(o.new_text for o in outputs).strip()
    entries = [e for o in outputs for e in o.new_logprobs]
    labels = [ACCEPTABLE, *CATEGORIES]
    mass = dict.fromkeys(labels, 0.0)
    for token, lp in entries[0].top if entries else []:  # the mask left only the labels' first tokens
        piece = tokenizer.decode([token]).strip()
        label = next((label for label in labels if piece and label.startswith(piece)), None)
        if label is not None:
            mass[label] += math.exp(lp)
    total = sum(mass.values())
    if not total:  # no alternatives to read: the label the model wrote
        return Moderation(text if text in labels else ACCEPTABLE, mass)
    # The label of most probability (a label's mass may span several first tokens, so it can differ from
    # the greedy text): flags and scores then always agree.
    scores = {k: v / total for k, v in mass.items()}
    return Moderation(max(scores, key=scores.get), scores)
