"""The built-in engine's sections: how it uses the machine ([engine]) and the model it
serves under its own id ([model])."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from modelyard.sampling import Sampling

from .base import (
    _FORBID,
    DEFAULT_MODEL_ID,
    DEFAULT_MODEL_SOURCE,
    Flag,
    Int,
    NonEmpty,
    NonNegative,
    Positive,
    PriceUnits,
    Seconds,
    Text,
    _price,
    parse_bytes,
)


@dataclass(frozen=True, config=_FORBID)
class EngineConfig:
    """How the built-in engine uses the machine."""

    max_sequences: Annotated[int, Strict(), Field(ge=1, le=256)] = 16
    """Sequences decoded together in one llama.cpp context (slots). 16 gave the most
    tokens/s in benchmarks/bench_serving.py on 2 cores; fewer gives lower per-token latency."""
    context_per_sequence: Annotated[int, Strict(), Field(ge=64)] = 4096
    """Tokens of KV cache each sequence may use (prompt + completion)."""
    step_token_budget: Int = 512
    """Tokens fed to one `llama_decode` call: decode tokens first, prefill chunks fill the
    rest; at least max_sequences."""
    max_waiting: NonNegative = 256
    """Requests allowed to wait for a slot; past this the server answers 503."""
    threads: NonNegative = 0
    """CPU threads for llama.cpp; 0 means one per core."""
    gpu_layers: NonNegative = 0
    """Layers offloaded to a GPU when llama.cpp was built for one."""
    flash_attention: Flag = True
    """Flash attention in llama.cpp; on the CPU it is faster at every batch size we measured."""
    kv_cache_type: Literal["f16", "q8_0"] = "f16"
    """The KV cache's number format: "q8_0" stores keys and values in 8 bits (about 1.9x
    the cells in the same memory; llama.cpp needs flash attention for it)."""
    prefix_caching: Flag = True
    """Reuse the KV cells of a finished sequence's prompt prefix for a new request."""
    speculation: Flag = False
    """Speculative decoding by prompt lookup (engine/speculation.py): draft tokens copied
    from the request's own prompt and output, verified in the batch's decode step; the
    text is the same as without it (greedy) or drawn from the same distribution."""
    speculation_max_draft: Annotated[int, Strict(), Field(ge=1, le=64)] = 16
    """Most draft tokens one sequence verifies in a step (fewer while its drafts fail)."""
    speculation_history: Flag = True
    """With speculation: also draft from the recent outputs of the request's own account
    (engine/account_history.py), never another's."""
    share_prefix_cache: Flag = False
    """Reuse cached prompt prefixes across accounts (one-tenant deployments). Off, each
    account reuses only its own, so no account can probe another's prompts."""
    fair_share: Flag = True
    """Share slots and prompt reading between accounts by weighted fair queuing (weights
    per account, priority per key; see engine/fair_share.py); false: first come, first
    served across all accounts."""
    reserved_slots: NonNegative = 1
    """With fair share, slots an account already holding one may not take while another
    account had work in the last 1024 steps, so a light account's request starts at once
    instead of waiting for one of a busy account's answers to end (a reserved slot may stay
    empty; an account alone for long gets every slot). One by default: without it a light
    account's first token waited seconds behind a flood (README, fair share); less than
    max_sequences (a one-slot engine keeps none)."""
    heavy_prefill_per_step: NonNegative = 64
    """With fair share, while another account has had work in the last 1024 steps: the
    most prompt tokens one step reads for an account holding at least its share of the
    slots (a light account's prompts are not capped), so the step a light account's
    request waits for is short: a step of 512 prompt tokens takes seconds on a CPU. The
    heavy account's prompts are read in more, shorter steps meanwhile. 0: no cap."""
    pause_heavy_every: NonNegative = 4
    """With fair share, a step that reads the prompt of an account holding fewer than its
    share of slots may pause the decoding of the accounts holding more than theirs for
    that step (nothing is dropped), so the light account's first token is not held up by
    a full batch: at most one step in this many on average (two in a row at most), so a
    heavy account keeps at least (N-1)/N of its decode steps; 0: never."""
    interrupt_heavy_steps: Flag = True
    """With `pause_heavy_every` set: a light account's request that comes while a step of
    the accounts above their share runs stops that step inside llama.cpp (its work is
    done again after the light request's step), so the request does not wait for the
    step in flight (about a decode step of the full batch). At most one step in
    `pause_heavy_every` on average besides the pauses, so a heavy account keeps at least
    (N-2)/N of its decode steps. Backends that cannot stop a decode (GPUs) finish it."""
    memory_budget: NonNegative = 0
    """Bytes the local models may hold together (an integer, or text such as "4GiB" or
    "512MB"): each model's GGUF file plus its KV cache (estimated from the file's
    metadata). Loading a `[[models]]` local model past it unloads the least recently used
    idle ones first; 0: no budget."""
    idle_unload_seconds: Annotated[float, Strict(), Field(ge=0)] = 600.0
    """A `[[models]]` local model with a `source` that answered no request for this long
    is unloaded (it loads again on its next request); 0: never."""
    load_timeout_seconds: Seconds = 120.0
    """How long a request waits for its model to load (then a 503 with Retry-After; the
    load goes on)."""

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("step_token_budget")
    @classmethod
    def _budget_fits_every_sequence(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("max_sequences", 1):
            raise ValueError("must be at least engine.max_sequences")
        return value

    @field_validator("kv_cache_type")
    @classmethod
    def _quantized_cache_needs_flash_attention(cls, value: str, info: ValidationInfo) -> str:
        if value != "f16" and not info.data.get("flash_attention", True):
            raise ValueError(f'"{value}" needs engine.flash_attention = true '
                             "(llama.cpp quantizes the V cache only with flash attention)")
        return value

    @field_validator("reserved_slots")
    @classmethod
    def _reserve_leaves_a_slot(cls, value: int, info: ValidationInfo) -> int:
        slots = info.data.get("max_sequences", 1)
        if value >= slots > 1:   # one slot: nobody holding it can take another anyway
            raise ValueError("must be less than engine.max_sequences")
        return value


@dataclass(frozen=True, config=_FORBID)
class ModelConfig:
    """One model the server answers for."""

    id: NonEmpty = DEFAULT_MODEL_ID
    source: Text = DEFAULT_MODEL_SOURCE
    default_max_tokens: Positive | None = None
    """Completion cap when a request names none; None means what the context leaves."""
    input_price: PriceUnits = 0.0
    """Currency units per million prompt tokens."""
    cached_input_price: PriceUnits | None = None
    """Per million prompt tokens served from the prefix cache; None: the input price."""
    output_price: PriceUnits = 0.0
    """Currency units per million completion tokens."""
    defaults: Sampling = Field(default_factory=Sampling)
    """[model.defaults] in the config file: what a request that leaves a sampling field
    out gets (each field on its own; one set nowhere is OpenAI's default). The providers
    in SPEC.md often use, e.g., temperature 0.7, top_p 0.7, top_k 50: set them per model."""
    chat_template: Text | None = None
    """Path to a Jinja chat template that replaces the one stored in the GGUF."""

    _prices = field_validator("input_price", "cached_input_price", "output_price")(_price)
