"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import Engine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("mistral7b:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("mistral7b:num_requests_waiting", "Requests waiting for a cache row.", registry=r)
        self.kv_usage = Gauge("mistral7b:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", registry=r)
        self.prefix_queries = Counter("mistral7b:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter("mistral7b:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   registry=r)
        self.preemptions = Counter("mistral7b:num_preemptions", "Sequences preempted for KV cache blocks.",
                                   registry=r)
        # Speculative decoding, with vLLM's names: acceptance rate = accepted / draft tokens, mean accepted
        # length = accepted / drafts.
        self.spec_drafts = Counter("mistral7b:spec_decode_num_drafts", "Verifications of guessed tokens.", registry=r)
        self.spec_draft_tokens = Counter("mistral7b:spec_decode_num_draft_tokens", "Guessed tokens verified.",
                                         registry=r)
        self.spec_accepted = Counter("mistral7b:spec_decode_num_accepted_tokens", "Guessed tokens accepted.",
                                     registry=r)
        self.prompt_tokens = Counter("mistral7b:prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter("mistral7b:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("mistral7b:request_success", "Finished requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("mistral7b:time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mistral7b:inter_token_latency_seconds", "Time between a sequence's tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._counted = {}  # counter -> the engine total already added to it

    def on_step(self, engine: Engine) -> None:
        """Called by the engine thread after every step."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_usage.set(engine.kv_usage)
        for counter, total in ((self.prompt_tokens, engine.prompt_tokens_total),
                               (self.generation_tokens, engine.generation_tokens_total),
                               (self.prefix_queries, engine.prefix_queries_total),
                               (self.prefix_hits, engine.prefix_hits_total),
                               (self.preemptions, engine.preemptions_total),
                               (self.spec_drafts, engine.spec_steps_total),
                               (self.spec_draft_tokens, engine.spec_proposed_total),
                               (self.spec_accepted, engine.spec_accepted_total)):
            counter.inc(total - self._counted.get(counter, 0))
            self._counted[counter] = total

    def on_token(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.itl).observe(seconds)
