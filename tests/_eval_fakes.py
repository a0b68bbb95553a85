"""A backend whose log-likelihoods and samples the test chooses, so expected scores can be worked out by hand."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


class FakeBackend:
    name = "fake"

    def __init__(self, ll=None, gen=None):
        self.ll, self.gen = ll, gen
        self.pairs: list[tuple[str, str]] = []
        self.prompts: list[str] = []
        self.how = None

    def loglikelihood(self, pairs):
        self.pairs += pairs
        return [self.ll(c, x) for c, x in pairs]

    def generate(self, prompts, how):
        self.prompts += prompts
        self.how = how
        out = [self.gen(p) for p in prompts]
        assert all(len(o) == how.n for o in out)
        return out
