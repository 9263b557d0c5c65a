"""The engine's Prometheus metrics, on a registry the HTTP layer exposes at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("modelyard_queue_depth", "Requests waiting for a slot.",
                                 registry=r)
        self.running = Gauge("modelyard_running_sequences", "Sequences holding a slot.",
                             registry=r)
        self.kv_reserved = Gauge("modelyard_kv_cells_reserved",
                                 "KV cells reserved by running sequences.", registry=r)
        self.sequences_per_step = Histogram(
            "modelyard_sequences_per_step", "Sequences in one llama_decode call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.tokens_per_step = Histogram(
            "modelyard_tokens_per_step", "Tokens in one llama_decode call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), registry=r)
        self.step_seconds = Histogram(
            "modelyard_step_seconds", "Wall time of one engine step.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.generated_tokens = Counter("modelyard_generated_tokens",
                                        "Tokens sampled (completion tokens).", registry=r)
        self.draft_tokens = Counter(
            "modelyard_draft_tokens", "Draft tokens verified (speculative decoding by prompt "
            "lookup).", registry=r)
        self.accepted_draft_tokens = Counter(
            "modelyard_accepted_draft_tokens", "Draft tokens kept: tokens generated without a "
            "step of their own.", registry=r)
        self.interrupted_steps = Counter(
            "modelyard_interrupted_steps", "Steps stopped during their decode so that a light "
            "account's request starts at once (fair share); their work is done again.",
            registry=r)
        self.prompt_tokens = Counter("modelyard_prompt_tokens", "Prompt tokens prefilled.",
                                     registry=r)
        self.cached_prompt_tokens = Counter(
            "modelyard_cached_prompt_tokens", "Prompt tokens whose KV cells were reused.",
            registry=r)
        self.time_to_first_token = Histogram(
            "modelyard_time_to_first_token_seconds",
            "From a request's arrival to its first sampled token.",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.finished = Counter("modelyard_finished_sequences", "Sequences finished, by reason.",
                                ["reason"], registry=r)
        self.rejected = Counter("modelyard_rejected_requests",
                                "Requests refused because the queue was full.", registry=r)


class EmbeddingMetrics:
    """The embedding worker's (engine/embedder.py)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.waiting = Gauge("modelyard_embedding_waiting_inputs",
                             "Embedding inputs waiting for the model.", registry=r)
        self.inputs_per_call = Histogram(
            "modelyard_embedding_inputs_per_call", "Inputs in one encode call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.tokens_per_call = Histogram(
            "modelyard_embedding_tokens_per_call", "Tokens in one encode call.",
            buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
        self.call_seconds = Histogram(
            "modelyard_embedding_call_seconds", "Wall time of one encode call.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.embedded_tokens = Counter("modelyard_embedded_tokens", "Tokens embedded.",
                                       registry=r)
        self.rejected = Counter("modelyard_embedding_rejected_requests",
                                "Embedding requests refused because the queue was full.",
                                registry=r)
