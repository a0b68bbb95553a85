"""Each task family scored on the fixture sets with chosen log-likelihoods and samples; the expected
numbers are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from _eval_fakes import FIXTURES, FakeBackend
from mistral7b.eval import TASKS, evaluate


def score(task, backend, **kw):
    return evaluate(TASKS[task], backend, FIXTURES, **kw)[0]


def test_multiple_choice_acc_and_acc_norm():
    table = {"Paris": -2, "a city called Berlin": -3, "Venus": -5, "Mars": -4, "Jupiter": -6, "milk": -3,
             "honey": -3, "six": -1, "eight": -2, "ten": -3, "four": -4}
    fake = FakeBackend(ll=lambda c, x: table[x.strip()])
    # acc:      Paris ok; Mars ok; milk/honey tie -> first (milk) wrong; six wrong        -> 2/4
    # acc_norm: -2/5 < -3/20 -> wrong; Jupiter -6/7 best -> wrong; honey -3/5 > -3/4 -> ok; six -> wrong -> 1/4
    assert score("arc_easy", fake) == {"acc": 0.5, "acc_norm": 0.25}
    assert fake.pairs[0] == ("Question: What is the capital of France?\nAnswer:", " Paris")


def test_winogrande_scores_the_shared_suffix_after_each_option():
    fake = FakeBackend(ll=lambda c, x: 0.0 if c.endswith(("trophy", "Maria")) else -1.0)
    assert score("winogrande", fake) == {"acc": 0.5}  # trophy (gold) right; Maria (not gold) wrong
    assert fake.pairs[:2] == [("The trophy doesn't fit into the suitcase because the trophy", " is too large."),
                              ("The trophy doesn't fit into the suitcase because the suitcase", " is too large.")]


def test_mmlu_averages_subjects_and_takes_shots_from_the_same_subject():
    fake = FakeBackend(ll=lambda c, x: 0.0 if x == " B" else -1.0)
    # mathematics: both golds are B -> 1.0; history: gold A -> 0.0; subjects averaged: 0.5 (not 2/3)
    assert score("mmlu", fake) == {"acc": 0.5}
    context = fake.pairs[0][0]
    assert context.startswith("The following are multiple choice questions (with answers) about elementary "
                              "mathematics.\n\n")
    assert "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n" in context and "World War" not in context
    assert context.endswith("What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")


def test_agieval_averages_exams():
    fake = FakeBackend(ll=lambda c, x: 0.0 if x.startswith(" (B)") else -1.0)
    assert score("agieval", fake) == {"acc": 0.5, "acc_norm": 0.5}  # sat-math gold B right, lsat-ar gold A wrong


def test_nq_open_exact_match_after_normalisation_with_shots():
    fake = FakeBackend(gen=lambda p: [" Thomas Jefferson"] if "declaration" in p else [" London"])
    assert score("nq_open", fake) == {"exact_match": pytest.approx(1 / 3)}  # Jefferson right, two Londons wrong
    assert fake.prompts[0].startswith("Answer these questions:\n\nQ: ")
    assert "Q: who painted the mona lisa?\nA: Leonardo da Vinci\n" in fake.prompts[0]
    assert fake.prompts[0].endswith("\nQ: who wrote the declaration of independence?\nA:")
    assert fake.how.stop == ("\n", ".", ",") and fake.how.temperature == 0


def test_triviaqa_matches_any_alias_ignoring_case_and_punctuation():
    fake = FakeBackend(gen=lambda p: ["planet MERCURY!"])
    assert score("triviaqa", fake) == {"exact_match": 1.0}
    assert "Question: What is the chemical symbol for gold?\nAnswer: Au\n\n" in fake.prompts[0]


def test_quac_f1_per_turn_with_the_dialogue_so_far():
    fake = FakeBackend(gen=lambda p: [" born in London"] if p.endswith("Where was Ada born?\nA:") else [" Somerville"])
    # turn 1 vs "Ada was born in London": P=3/3, R=3/5 -> 0.75 (vs "London": 0.5); turn 2 vs "Mary Somerville": 2/3
    assert score("quac", fake)["f1"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert "Q: Where was Ada born?\nA: Ada was born in London\n\nQ: Who taught her mathematics?\nA:" in fake.prompts[1]
    assert "CANNOTANSWER" not in fake.prompts[0]


def test_gsm8k_majority_of_eight_samples():
    def samples(prompt):
        if prompt.endswith("How many apples does he have?\nAnswer:"):
            return ["The answer is 7."] * 3 + ["The answer is 8."] * 2 + ["no idea"] * 3  # vote 7: right
        return ["The answer is 1,000."] * 2 + ["So 999 remain."] * 3 + ["x"] * 3  # vote 999: wrong
    fake = FakeBackend(gen=samples)
    assert score("gsm8k", fake, seed=5) == {"maj@8": 0.5}
    assert fake.how.n == 8 and fake.how.seed == 5 and fake.how.temperature > 0
    assert "Answer: 2 + 1 = 3 cats.\nThe answer is 3.\n\n" in fake.prompts[0]  # shot: calculator marks dropped


def test_math_majority_of_four_with_latex_normalisation():
    def samples(prompt):
        if "2x = 6" in prompt.rsplit("Problem:", 1)[1]:
            return ["so $x=\\boxed{3}$", "\\boxed{3}", "\\boxed{4}", "none"]  # 3: right
        return ["\\boxed{\\frac{3}{4}}", "\\boxed{0.75}", "\\boxed{ \\frac{3}{4} }", "\\boxed{1}"]  # \frac{3}{4} = \dfrac{3}{4}
    fake = FakeBackend(gen=samples)
    assert score("hendrycks_math", fake) == {"maj@4": 1.0}
    assert fake.how.n == 4


def test_bbh_chain_of_thought_answer_extraction():
    fake = FakeBackend(gen=lambda p: ["not True = False. So the answer is False."])
    assert score("bbh", fake) == {"exact_match": 0.5}  # targets False (right), True (wrong)
    assert fake.prompts[0].startswith("Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not")
    assert fake.prompts[0].endswith("So the answer is True.\n\nQ: not ( True ) and ( True ) is\nA: Let's think step by step.")


def test_code_pass_at_1_by_execution():
    fake = FakeBackend(gen=lambda p: ["    return a + b\n"] if "def add(a, b):\n    \"\"\"Return" in p else ["    return n % 2 == 1\n"])
    assert score("humaneval", fake) == {"pass@1": 0.5}
    fake = FakeBackend(gen=lambda p: ["def square(x):\n    return x * x\n"] if "square" in p.rsplit("[BEGIN]", 1)[0][-300:]
                       else ["def rev(s):\n    return s\n"])
    assert score("mbpp", fake) == {"pass@1": 0.5}
    assert fake.prompts[0].count("[DONE]") == 3 and fake.prompts[0].endswith("assert square(0) == 0\n[BEGIN]\n")


def test_limit_and_few_shot_are_deterministic():
    runs = []
    for _ in range(2):
        fake = FakeBackend(gen=lambda p: [" x"])
        score("nq_open", fake, limit=1, seed=3)
        runs.append(fake.prompts)
    assert len(runs[0]) == 1 and runs[0] == runs[1]
    fake = FakeBackend(gen=lambda p: [" x"])
    score("nq_open", fake, num_fewshot=0)
    assert fake.prompts[0] == "Answer these questions:\n\nQ: who wrote the declaration of independence?\nA:"
