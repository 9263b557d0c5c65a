"""What the scheduler is configured with, and the plan of one step it hands the engine.

`SchedulerConfig` holds the engine's limits and policies (scheduler.py explains them);
`SchedulerOutput` is one step: the chunks one `llama_decode` call reads, and the KV
truncations and copies to apply before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelyard.engine.sequence import Sequence
from modelyard.engine.speculation import SpeculationConfig


@dataclass(frozen=True)
class SchedulerConfig:
    max_sequences: int
    step_token_budget: int
    kv_capacity: int
    """KV cells in the shared cache, across all sequences."""
    context_per_sequence: int
    max_waiting: int
    prefix_caching: bool = True
    min_copy_tokens: int = 0
    """Shortest prefix worth copying from a running sequence's slot: a copy between slots
    moves the whole KV stream, so a short prefix is cheaper to read again."""
    max_cached_cells: int | None = None
    """Most KV cells free slots may keep for prefix caching (None: no bound). In a unified
    cache every token attends over the used range, so kept cells cost every step."""
    low_slots_first: bool = False
    """Prefer the lowest free slot (on ties and when nothing matches) over the one freed
    longest ago: with one KV stream per slot, llama.cpp's cost grows with the highest slot
    index in a batch, so keeping running sequences in low slots keeps steps cheap."""
    last_prompt_token_alone: bool = True
    """Read a prompt's last token in a step of its own, after the rest of the prompt. The
    logits of the first sample then come from that one token whether the prefix before it
    was read or found in the prefix cache, so a seed gives the same text either way:
    llama.cpp's attention for a token inside a chunk of many takes another path (tiled)
    than for a token alone, which moved first-token log-probabilities by hundredths."""
    fair_share: bool = True
    """Share slots and prefill between accounts (`Sequence.share`) by weighted fair
    queuing; off, every sequence waits in one queue, first come, first served."""
    reserved_slots: int = 0
    """With fair share: free slots an account holding one or more and at least its share
    of the slots may not take while another account has had work lately
    (RESERVE_MEMORY_STEPS), so a light account's request starts at once instead of
    waiting for a slot to free (a light account's second request too: it may take them).
    Not work-conserving: a reserved slot may stay empty; an account alone for long gets
    every slot again."""
    speculation: SpeculationConfig | None = None
    """Draft tokens by prompt lookup for the sequences that have a drafter (speculation.py);
    None: every decode chunk is one token."""
    heavy_prefill_per_step: int = 0
    """With fair share, while another account has had work lately (RESERVE_MEMORY_STEPS):
    the most prompt tokens a step reads for the accounts at or above their share of
    slots, so the step in flight when a light account's request comes is short (a step
    of `step_token_budget` prompt tokens takes seconds on a CPU). 0: no cap."""
    pause_heavy_every: int = 0
    """With fair share: a step that reads the prompt of an account holding fewer than its
    share of slots may leave out the decoding of the accounts holding more than theirs
    (paused for that step, no KV dropped), so it costs about as much as that prompt
    alone; at most one step in this many on average, in bursts of at most PAUSE_BURST
    (a short prompt and its last token). 0: never."""
    interrupt_heavy_steps: bool = False
    """With `pause_heavy_every` set: a light account's request that comes while a step
    serving the accounts at or above their share runs stops that step (the engine
    interrupts `llama_decode`; nothing of it is kept and it is done again after the light
    request's step), so the light request does not wait for the step in flight. At most
    one step in `pause_heavy_every` on average, besides the pauses."""


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int
    """Position of the first token of `tokens` in the sequence."""
    tokens: list[int]
    sample: bool
    """Whether this chunk reaches the end of the sequence, so its last logits are sampled."""
    num_draft: int = 0
    """Draft tokens at the end of `tokens` (speculation.py): the logits of the sequence's
    last token and of every draft are sampled, and the drafts kept up to the first one
    that differs from the token sampled before it."""

    @property
    def draft(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.num_draft:]


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    kv_truncations: list[tuple[int, int]] = field(default_factory=list)
    """(slot, keep): drop the slot's KV cells from position `keep` on, before the batch runs."""
    kv_copies: list[tuple[int, int, int]] = field(default_factory=list)
    """(source slot, slot, n): give the slot the source's cells for positions [0, n), after
    the truncations and before the batch runs."""

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.tokens) for chunk in self.chunks)

    @property
    def num_sequences(self) -> int:
        return len(self.chunks)
