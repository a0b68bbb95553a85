"""The benchmark tasks of Mistral 7B's table: each dataset's prompt, answer and metric.

Prompts follow lm-eval's task definitions where one exists (same names, same templates and target
delimiter), so numbers are comparable with it. Three families:
`MultipleChoice` (scored by log-likelihood), `Generation` (sampled, then scored from the text) and
`Code` (generated, then executed in the sandbox).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from ..errors import InputError
from . import metrics
from .backends import Sampling
from .data import cached_split, load_split, split_file
from .fewshot import sample_shots

CATEGORIES = {
    "commonsense_reasoning": "Commonsense Reasoning",
    "world_knowledge": "World Knowledge",
    "reading_comprehension": "Reading Comprehension",
    "math": "Math",
    "code": "Code",
    "aggregated": "MMLU/BBH/AGIEval",
}


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    source: str  # the Hugging Face dataset, "repo" or "repo (config)"; "<subset>" stands for each subset
    split: str  # the split scored
    primary: str  # the metric that enters the category average
    shots: int = 0
    fewshot_split: str | None = None  # where shots come from (None: the scored split itself)
    subsets: tuple[str, ...] = ()  # sub-folders scored alone, then averaged (BBH tasks, AGIEval exams)
    group_by: str | None = None  # a field whose groups are scored alone, then averaged (MMLU's subject)
    description: Callable[[dict], str] = lambda doc: ""  # text before the shots
    fewshot_delimiter: str = "\n\n"
    expand: Callable[[dict], list[dict]] | None = None  # one row -> several scored examples (QuAC turns)

    def folder(self, subset: str | None) -> str:
        return self.name if subset is None else f"{self.name}/{subset}"

    def hub(self, subset: str | None) -> str:
        return self.source.replace("<subset>", subset or "")

    def load(self, data_dir: str | Path, subset: str | None, split: str) -> list[dict]:
        return load_split(data_dir, self.folder(subset), split, self.hub(subset))

    def available(self, data_dir: str | Path, subset: str) -> bool:
        """Whether a subset's scored split is in --data-dir or the `datasets` cache."""
        return (split_file(Path(data_dir) / self.folder(subset), self.split) is not None
                or bool(cached_split(self.hub(subset), self.split)))

    def pool(self, data_dir: str | Path, subset: str | None) -> list[dict]:
        """Where the shots of one subset come from."""
        return self.load(data_dir, subset, self.fewshot_split or self.split)

    def prefix(self, pool: list[dict], doc: dict, k: int, seed: int, key: str) -> str:
        """The description and k solved examples before the document's own prompt; shots of a
        grouped task (MMLU) come from the document's own group."""
        if self.group_by:
            pool = [d for d in pool if d[self.group_by] == doc[self.group_by]]
        shots = sample_shots(pool, k, seed, key, exclude=doc if self.fewshot_split is None else None)
        return self.description(doc) + "".join(self.shot(s) + self.fewshot_delimiter for s in shots)

    def shot(self, doc: dict) -> str:
        """One solved example as it appears among the shots."""
        raise NotImplementedError


@dataclass(frozen=True)
class MultipleChoice(Task):
    text: Callable[[dict], str] = None
    choices: Callable[[dict], list[str]] = None
    gold: Callable[[dict], int] = None
    delimiter: str = " "  # lm-eval's target_delimiter, between context and choice
    metrics: tuple[str, ...] = ("acc", "acc_norm")

    def pairs(self, doc: dict) -> list[tuple[str, str]]:
        """(context, continuation) per choice, before the few-shot prefix."""
        return [(self.text(doc), self.delimiter + c) for c in self.choices(doc)]

    def shot(self, doc: dict) -> str:
        return self.text(doc) + self.delimiter + self.choices(doc)[self.gold(doc)]

    def score(self, logliks: list[float], doc: dict) -> dict[str, float]:
        scores = metrics.multiple_choice(logliks, self.choices(doc), self.gold(doc))
        return {m: scores[m] for m in self.metrics}


@dataclass(frozen=True)
class PartialChoice(MultipleChoice):
    """Winogrande's partial scoring: each option fills the blank in the context and the shared rest
    of the sentence is the scored continuation (lm-eval's multiple-input form)."""

    suffix: Callable[[dict], str] = None
    metrics: tuple[str, ...] = ("acc",)

    def pairs(self, doc: dict) -> list[tuple[str, str]]:
        return [(c, self.delimiter + self.suffix(doc)) for c in self.choices(doc)]

    def shot(self, doc: dict) -> str:
        return self.choices(doc)[self.gold(doc)] + self.delimiter + self.suffix(doc)


@dataclass(frozen=True)
class Generation(Task):
    prompt: Callable[[dict], str] = None
    answer: Callable[[dict], str] = None  # the solved text of a shot
    how: Sampling = Sampling(max_tokens=32)
    score_samples: Callable[[list[str], dict], dict[str, float]] = None
    delimiter: str = " "

    def shot(self, doc: dict) -> str:
        return self.prompt(doc) + self.delimiter + self.answer(doc)


@dataclass(frozen=True)
class ChainOfThought(Generation):
    """BBH: the three published chain-of-thought examples of each task (cot-prompts/<task>.txt from
    the BIG-Bench-Hard repository) come before every question."""

    def pool(self, data_dir: str | Path, subset: str | None) -> list[dict]:
        path = Path(data_dir) / self.name / "cot-prompts" / f"{subset}.txt"
        if not path.is_file():
            raise InputError(f"missing {path}: copy cot-prompts/{subset}.txt from "
                             "https://github.com/suzgun/BIG-Bench-Hard there")
        return [{"text": path.read_text(encoding="utf-8").split("-----", 1)[-1].strip()}]

    def prefix(self, pool: list[dict], doc: dict, k: int, seed: int, key: str) -> str:
        return pool[0]["text"] + "\n\n" if k else ""


@dataclass(frozen=True)
class Code(Generation):
    program: Callable[[dict, str], str] = None  # (doc, completion) -> the script whose exit status is the verdict
    primary: str = "pass@1"


# -- the datasets' fields ---------------------------------------------------------------------

def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _lettered(question: str, options: list[str]) -> str:
    lines = [question.strip()] + [f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def _by_label(doc: dict) -> int:
    return doc["choices"]["label"].index(doc["answerKey"].strip())


def _winogrande_options(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + doc[o] for o in ("option1", "option2")]


def _em(samples: list[str], doc: dict, *, targets: Callable[[dict], list[str]], **options) -> dict[str, float]:
    return {"exact_match": metrics.exact_match(samples[0].strip(), targets(doc), **options)}


def _quac_turns(doc: dict) -> list[dict]:
    """One example per question, the dialogue so far (with the reference answers) in its prompt."""
    context = doc["context"].removesuffix("CANNOTANSWER").strip()
    head = f"TITLE: {doc['wikipedia_page_title']}\nBACKGROUND: {doc['background']}\n\n{context}\n\n"
    answers = doc["answers"]["texts"]
    turns, history = [], ""
    for question, refs in zip(doc["questions"], answers):
        turns.append({"prompt": f"{head}{history}Q: {question}\nA:", "answers": refs})
        history += f"Q: {question}\nA: {refs[0]}\n\n"
    return turns


def _gsm8k_solution(doc: dict) -> str:
    """The reference solution as the shots show it: calculator marks dropped, ending "The answer is N."."""
    reasoning, answer = doc["answer"].split("####")
    reasoning = re.sub(r"<<.*?>>", "", reasoning).strip()
    return f"{reasoning}\nThe answer is {answer.strip()}."


def _majority(samples: list[str], doc: dict, *, extract, gold, k: int) -> dict[str, float]:
    """maj@k: the most common extracted answer among the k samples against the reference."""
    vote = metrics.majority([extract(s) for s in samples])
    return {f"maj@{k}": float(vote is not None and vote == gold(doc))}


def _math_answer(text: str) -> str | None:
    boxed = metrics.last_boxed(text)
    return None if boxed is None else metrics.normalize_math(boxed)


def _mbpp_prompt(doc: dict) -> str:
    tests = "\n".join(doc["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


# -- the tasks ------------------------------------------------------------------------------

MMLU_FORMAT = "The following are multiple choice questions (with answers) about {}.\n\n"
AGIEVAL_EN = ("aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage", "sat-math")
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting")
MATH_SUBSETS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                "prealgebra", "precalculus")
# Minerva's maj@k sampling temperature.
MAJ_TEMPERATURE = 0.6
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_ARC = dict(category="commonsense_reasoning", split="test", primary="acc_norm",
            text=lambda d: f"Question: {d['question']}\nAnswer:", choices=lambda d: d["choices"]["text"], gold=_by_label)

TASKS: dict[str, Task] = {t.name: t for t in [
    MultipleChoice("hellaswag", "commonsense_reasoning", "Rowan/hellaswag", "validation", "acc_norm",
                   text=lambda d: _hellaswag_clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
                   choices=lambda d: [_hellaswag_clean(e) for e in d["endings"]], gold=lambda d: int(d["label"])),
    PartialChoice("winogrande", "commonsense_reasoning", "allenai/winogrande (winogrande_xl)", "validation", "acc",
                  choices=_winogrande_options, gold=lambda d: int(d["answer"]) - 1,
                  suffix=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip()),
    MultipleChoice("piqa", "commonsense_reasoning", "ybisk/piqa (plain_text)", "validation", "acc_norm",
                   text=lambda d: f"Question: {d['goal']}\nAnswer:", choices=lambda d: [d["sol1"], d["sol2"]],
                   gold=lambda d: int(d["label"])),
    MultipleChoice("siqa", "commonsense_reasoning", "allenai/social_i_qa", "validation", "acc",
                   text=lambda d: f"Q: {d['context']} {d['question']}\nA:",
                   choices=lambda d: [d["answerA"], d["answerB"], d["answerC"]], gold=lambda d: int(d["label"]) - 1),
    MultipleChoice("openbookqa", "commonsense_reasoning", "allenai/openbookqa (main)", "test", "acc_norm",
                   text=lambda d: d["question_stem"], choices=lambda d: d["choices"]["text"], gold=_by_label),
    MultipleChoice("arc_easy", source="allenai/ai2_arc (ARC-Easy)", **_ARC),
    MultipleChoice("arc_challenge", source="allenai/ai2_arc (ARC-Challenge)", **_ARC),
    MultipleChoice("commonsense_qa", "commonsense_reasoning", "tau/commonsense_qa", "validation", "acc",
                   text=lambda d: _lettered("Question: " + d["question"].strip(), d["choices"]["text"]),
                   choices=lambda d: d["choices"]["label"], gold=_by_label, metrics=("acc",)),
    Generation("nq_open", "world_knowledge", "google-research-datasets/nq_open (nq_open)", "validation", "exact_match",
               shots=5, fewshot_split="train", description=lambda d: "Answer these questions:\n\n",
               fewshot_delimiter="\n", prompt=lambda d: f"Q: {d['question']}?\nA:", answer=lambda d: d["answer"][0],
               how=Sampling(max_tokens=32, stop=("\n", ".", ",")),
               score_samples=partial(_em, targets=lambda d: d["answer"],
                                     regexes_to_ignore=(r"\b(?:The |the |An |A |The |a |an )",))),
    Generation("triviaqa", "world_knowledge", "mandarjoshi/trivia_qa (rc.nocontext)", "validation", "exact_match",
               shots=5, fewshot_split="train", prompt=lambda d: f"Question: {d['question']}?\nAnswer:",
               answer=lambda d: d["answer"]["aliases"][0], how=Sampling(max_tokens=32, stop=("\n", ".", ",")),
               score_samples=partial(_em, targets=lambda d: d["answer"]["aliases"])),
    MultipleChoice("boolq", "reading_comprehension", "super_glue (boolq)", "validation", "acc",
                   text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                   choices=lambda d: ["no", "yes"], gold=lambda d: int(d["label"]), metrics=("acc",)),
    Generation("quac", "reading_comprehension", "allenai/quac (plain_text)", "validation", "f1", expand=_quac_turns,
               prompt=lambda d: d["prompt"], answer=lambda d: d["answers"][0], how=Sampling(max_tokens=32, stop=("\n",)),
               score_samples=lambda s, d: {"f1": metrics.f1(s[0].strip(), d["answers"])}),
    Generation("gsm8k", "math", "openai/gsm8k (main)", "test", "maj@8", shots=8, fewshot_split="train",
               prompt=lambda d: f"Question: {d['question']}\nAnswer:", answer=_gsm8k_solution,
               how=Sampling(max_tokens=256, stop=("\n\nQuestion:", "Question:"), n=8, temperature=MAJ_TEMPERATURE),
               score_samples=partial(_majority, extract=metrics.extract_number, k=8,
                                     gold=lambda d: metrics.extract_number(d["answer"].split("####")[-1]))),
    Generation("hendrycks_math", "math", "EleutherAI/hendrycks_math (<subset>)", "test", "maj@4", shots=4,
               fewshot_split="train", subsets=MATH_SUBSETS, delimiter="\n",
               prompt=lambda d: f"Problem:\n{d['problem']}\n\nSolution:", answer=lambda d: d["solution"],
               how=Sampling(max_tokens=512, stop=("\n\nProblem:",), n=4, temperature=MAJ_TEMPERATURE),
               score_samples=partial(_majority, extract=_math_answer, k=4, gold=lambda d: _math_answer(d["solution"]))),
    Code("humaneval", "code", "openai/openai_humaneval (openai_humaneval)", "test", prompt=lambda d: d["prompt"], delimiter="",
         answer=lambda d: d["canonical_solution"], how=Sampling(max_tokens=512, stop=HUMANEVAL_STOP),
         program=lambda d, c: f"{d['prompt']}{c}\n\n{d['test']}\n\ncheck({d['entry_point']})\n"),
    Code("mbpp", "code", "google-research-datasets/mbpp (full)", "test", shots=3, fewshot_split="prompt",
         prompt=_mbpp_prompt, delimiter="", answer=lambda d: f"{d['code']}\n[DONE]",
         how=Sampling(max_tokens=512, stop=("[DONE]",)),
         program=lambda d, c: "\n".join([d.get("test_setup_code") or "", c, *d["test_list"]]) + "\n"),
    MultipleChoice("mmlu", "aggregated", "cais/mmlu (all)", "test", "acc", shots=5, fewshot_split="dev",
                   group_by="subject", description=lambda d: MMLU_FORMAT.format(d["subject"].replace("_", " ")),
                   text=lambda d: _lettered(d["question"], d["choices"]), choices=lambda d: list("ABCD"),
                   gold=lambda d: int(d["answer"]), metrics=("acc",)),
    ChainOfThought("bbh", "aggregated", "lukaemon/bbh (<subset>)", "test",
               "exact_match", shots=3, subsets=BBH_TASKS,
               prompt=lambda d: f"Q: {d['input']}\nA: Let's think step by step.", answer=lambda d: d["target"],
               how=Sampling(max_tokens=256, stop=("\n\nQ:",)),
               score_samples=lambda s, d: {"exact_match": float(metrics.extract_bbh(s[0]) == d["target"].strip())}),
    MultipleChoice("agieval", "aggregated", "hails/agieval-<subset>", "test", "acc", subsets=AGIEVAL_EN,
                   text=lambda d: d["query"], choices=lambda d: d["choices"], gold=lambda d: d["gold"][0]),
]}
