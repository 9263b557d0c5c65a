"""The built-in engine as a Provider: chat template, tokenization, context limits, and the
request's tools, response format and reasoning turned into what the engine enforces."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.chat.reasoning import reasoning_tags
from modelyard.chat.shield import Prompt, SpecialTextShield
from modelyard.chat.template import ChatTemplate, TemplateError
from modelyard.chat.tool_parsers import TOOL_PARSERS, TaggedJsonToolParser, tool_family
from modelyard.config import Config, EngineConfig
from modelyard.engine.engine import Engine, EngineOutput, ReasoningTags
from modelyard.engine.grammar import GrammarCompiler
from modelyard.engine.metrics import EngineMetrics
from modelyard.engine.runner import LlamaRunner, RunnerConfig
from modelyard.engine.scheduler import QueueFullError, SchedulerConfig
from modelyard.engine.sequence import COMMON_SHARE, SamplingParams
from modelyard.engine.speculation import SpeculationConfig
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    ChatStream,
    DeltaStream,
    PreparedChat,
    Provider,
    ProviderError,
    RawPrompt,
    StreamError,
    TokenLogprobs,
)
from modelyard.providers.constraints import Plan, ToolTokens, plan
from modelyard.providers.local_tokens import LocalTokenizer
from modelyard.providers.output import ChoiceOutput
from modelyard.sampling import Sampling
from modelyard.usage import Usage

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2


@dataclass(frozen=True)
class _LocalWork:
    prompt_ids: list[int]
    params: SamplingParams
    plan: Plan
    inside_reasoning: bool
    """The template opened a reasoning block: the output starts inside it."""


def scheduler_config(engine_config: EngineConfig,
                     speculation: SpeculationConfig | None) -> SchedulerConfig:
    """The scheduler's settings from the `[engine]` section (and speculation's, measured
    on the model when it is on): one slot of `context_per_sequence` cells per sequence."""
    return SchedulerConfig(
        max_sequences=engine_config.max_sequences,
        step_token_budget=engine_config.step_token_budget,
        kv_capacity=engine_config.max_sequences * engine_config.context_per_sequence,
        context_per_sequence=engine_config.context_per_sequence,
        max_waiting=engine_config.max_waiting,
        prefix_caching=engine_config.prefix_caching,
        max_cached_cells=2 * engine_config.context_per_sequence,
        fair_share=engine_config.fair_share,
        reserved_slots=engine_config.reserved_slots,
        speculation=speculation,
        heavy_prefill_per_step=engine_config.heavy_prefill_per_step,
        pause_heavy_every=engine_config.pause_heavy_every,
        interrupt_heavy_steps=engine_config.interrupt_heavy_steps,
    )


class LocalProvider(Provider[_LocalWork]):
    def __init__(self, config: Config, model_path: Path,
                 metrics: EngineMetrics | None = None) -> None:
        self.defaults: Sampling = config.model.defaults
        engine_config = config.engine
        self.model_id = config.model.id
        self.default_max_tokens = config.model.default_max_tokens
        self.context_per_sequence = engine_config.context_per_sequence
        self.share_prefix_cache = engine_config.share_prefix_cache
        n_ctx = engine_config.max_sequences * engine_config.context_per_sequence
        self.runner = LlamaRunner(RunnerConfig(
            model_path=model_path,
            n_seq_max=engine_config.max_sequences,
            n_ctx=n_ctx,
            n_batch=engine_config.step_token_budget,
            threads=engine_config.threads,
            gpu_layers=engine_config.gpu_layers,
            flash_attention=engine_config.flash_attention,
            kv_cache_type=engine_config.kv_cache_type,
        ))
        template_source = (Path(config.model.chat_template).read_text(encoding="utf-8")
                           if config.model.chat_template else self.runner.chat_template())
        self.template = ChatTemplate(
            template_source,
            bos_token=self.runner.token_text(self.runner.bos_id),
            eos_token=self.runner.token_text(self.runner.eos_id),
        )
        self.shield = SpecialTextShield(self.runner.control_token_texts())
        self.grammar = GrammarCompiler(self.runner.grammar_tokenizer(), self.runner.n_vocab)
        self.tool_family = tool_family(self.template.source)
        self.tool_tokens = self._tool_tokens()
        self.think_tags = reasoning_tags(self.template.source)
        self.engine = Engine(
            self.runner, scheduler_config(engine_config, self._speculation(engine_config)),
            metrics, self.grammar)
        self.engine.start()

    def _speculation(self, engine_config: EngineConfig) -> SpeculationConfig | None:
        """Speculation's settings, with what a step of n tokens costs on this machine
        measured now (7-8 s on a 2-core CPU), before the engine decodes anything."""
        if not engine_config.speculation:
            return None
        costs = self.runner.measure_step_costs()
        logger.info("%s: decode step cost by tokens (in one-token steps): %s", self.model_id,
                    ", ".join(f"{n}: {cost:.2f}" for n, cost in costs))
        return SpeculationConfig(max_draft=engine_config.speculation_max_draft,
                                 step_costs=costs,
                                 account_history=engine_config.speculation_history)

    def describe(self) -> dict[str, Any]:
        return {
            "context_length": self.context_per_sequence,
            "capabilities": {"tools": self.tool_tokens is not None, "json_schema": True,
                             "reasoning": self.think_tags is not None, "vision": False},
        }

    def context_limit(self) -> int:
        return self.context_per_sequence

    def max_tokens_bound(self, request: ChatRequest) -> int:
        room = self.context_per_sequence
        return min(request.max_tokens or self.default_max_tokens or room, room)

    def _tool_tokens(self) -> ToolTokens | None:
        parser = TOOL_PARSERS.get(self.tool_family or "")
        if parser is None or not issubclass(parser, TaggedJsonToolParser):
            return None
        opening = self.runner.tokenize(parser.open_tag, add_special=False)
        closing = self.runner.tokenize(parser.close_tag, add_special=False)
        if len(opening) != 1 or len(closing) != 1:
            return None  # the tags are not single tokens: no constrained calls
        return ToolTokens(opening[0], closing[0])

    def render_prompt(self, messages: list[dict[str, Any]], **kwargs: Any) -> Prompt:
        """The template's rendering, cut into its own markup and the request's text (see
        chat/shield.py: special-token text in the request stays text)."""
        try:
            return self.shield.render(self.template.render, messages, **kwargs)
        except TemplateError as exc:
            raise ProviderError(422, str(exc), param="messages", code="invalid_value") from exc

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Markup with special tokens parsed, the request's special-token text as text."""
        add_bos = self.runner.add_bos and not self.template_starts_with_bos(prompt.text)
        ids: list[int] = []
        for index, piece in enumerate(prompt.pieces):
            ids += self.runner.tokenize(piece.text, add_special=add_bos and index == 0,
                                        special=piece.special)
        return ids

    def template_starts_with_bos(self, prompt: str) -> bool:
        bos = self.runner.token_text(self.runner.bos_id)
        return bool(bos) and prompt.startswith(bos)

    def sampling_params(self, request: ChatRequest, num_prompt: int) -> SamplingParams:
        room = self.context_per_sequence - num_prompt
        if room < 1:
            raise ProviderError(
                422, f"the prompt is {num_prompt} tokens, and this model's context holds "
                f"{self.context_per_sequence} tokens in all", param="messages",
                code="context_length_exceeded")
        max_tokens = request.max_tokens or min(self.default_max_tokens or room, room)
        if max_tokens > room:
            if not request.truncate_to_context:
                raise ProviderError(
                    422, f"prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) exceeds "
                    f"the context of {self.context_per_sequence} tokens",
                    param="max_tokens", code="context_length_exceeded")
            max_tokens = room
        for token in request.logit_bias:
            if not 0 <= token < self.runner.n_vocab:
                raise ProviderError(422, f"logit_bias names token id {token}, outside this "
                                    f"model's vocabulary of {self.runner.n_vocab} tokens",
                                    param="logit_bias", code="invalid_value")
        return request.to_sampling_params(self.defaults, max_tokens)

    def completion_prompt_ids(self, raw: RawPrompt) -> list[int]:
        """A text completion's prompt as it is, no template: its special-token text parsed
        (the client writes the whole input, markup included), or its token ids; with a
        suffix, in the model's fill-in-the-middle format (prefix, suffix, middle)."""
        if raw.token_ids is not None:
            ids = list(raw.token_ids)
            for token in ids:
                if not 0 <= token < self.runner.n_vocab:
                    raise ProviderError(422, f"prompt names token id {token}, outside this "
                                        f"model's vocabulary of {self.runner.n_vocab} tokens",
                                        param="prompt", code="invalid_value")
        else:
            ids = self.runner.tokenize(raw.text or "", add_special=False)
        if raw.suffix is not None:
            fim = self.runner.fim_tokens()
            if fim is None:
                raise ProviderError(422, f"the model '{self.model_id}' has no "
                                    "fill-in-the-middle tokens, so it cannot take a suffix",
                                    param="suffix", code="unsupported_parameter")
            prefix, suffix, middle = fim
            ids = [prefix, *ids, suffix,
                   *self.runner.tokenize(raw.suffix, add_special=False), middle]
        if raw.token_ids is None and self.runner.add_bos:
            ids.insert(0, self.runner.bos_id)
        if not ids:
            raise ProviderError(422, "the prompt is empty", param="prompt",
                                code="invalid_value")
        return ids

    def prompt_text(self, raw: RawPrompt) -> str:
        """What `echo` puts before a completion: the prompt's text."""
        if raw.token_ids is None:
            return raw.text or ""
        return b"".join(self.runner.token_bytes(t) for t in raw.token_ids).decode(
            "utf-8", errors="replace")

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[_LocalWork]:
        raw = request.prompt
        work = plan(request, self.grammar, self.tool_tokens,
                    self.think_tags is not None and raw is None)
        if raw is not None:
            prompt_ids = self.completion_prompt_ids(raw)
            inside = False
        else:
            prompt = self.render_prompt(request.messages, **work.template_kwargs)
            prompt_ids = self.tokenize_prompt(prompt)
            inside = (self.think_tags is not None
                      and prompt.text.rstrip().endswith(self.think_tags.open))
        params = self.sampling_params(request, len(prompt_ids))
        bias = dict(params.logit_bias)
        bias.update({token: float("-inf") for token in work.banned_tokens})
        params = dataclasses.replace(params, logit_bias=bias,
                                     thinking_budget=work.thinking_budget)
        return PreparedChat(request, len(prompt_ids), params.max_tokens,
                            _LocalWork(prompt_ids, params, work, inside), self)

    async def start_chat(self, prepared: PreparedChat[_LocalWork]) -> ChatStream:
        work = prepared.work
        request = prepared.request
        tags = self.think_tags if request.prompt is None else None
        # At the thinking budget the engine writes the closing tag and a blank line itself.
        reasoning = (ReasoningTags(tags.close, tuple(self.runner.tokenize(
            tags.close + "\n\n", add_special=False))) if tags is not None
            and work.inside_reasoning else None)
        try:
            queue = self.engine.submit(request.request_id, work.prompt_ids, work.params,
                                       request.n, constraint=work.plan.constraint,
                                       reasoning=reasoning,
                                       cache_scope=None if self.share_prefix_cache
                                       else request.cache_scope,
                                       share=request.share or COMMON_SHARE)
        except QueueFullError as exc:
            raise ProviderError(503, "the server is overloaded; retry shortly",
                                code="server_overloaded",
                                retry_after=RETRY_AFTER_SECONDS) from exc
        outputs = [ChoiceOutput(
            reasoning=tags, starts_inside_reasoning=work.inside_reasoning,
            separate_reasoning=request.separate_reasoning,
            tool_parser=TOOL_PARSERS[self.tool_family](
                frozenset(tool["function"]["name"] for tool in request.tools))
            if work.plan.parse_tools and self.tool_family else None,
        ) for _ in range(request.n)]
        echo = (self.prompt_text(request.prompt) if request.prompt is not None
                and request.prompt.echo else "")
        return DeltaStream(self._stream(request.request_id, outputs, queue, echo,
                                        prepared.prompt_tokens))

    async def _stream(self, request_id: str, outputs: list[ChoiceOutput],
                      queue: asyncio.Queue[EngineOutput], echo: str = "",
                      num_prompt: int = 0) -> AsyncGenerator[ChatDelta, None]:
        n = len(outputs)
        finished = 0
        completion = [0] * n
        reasoning = [0] * n
        cached = 0
        try:
            if echo:
                for index in range(n):
                    yield ChatDelta(echo, Usage(num_prompt), index=index)
            while finished < n:
                output = await queue.get()
                if output.error is not None:
                    finished = n
                    raise StreamError(output.error)
                completion[output.index] = output.num_output_tokens
                reasoning[output.index] = output.num_reasoning_tokens
                reason = output.finish_reason.value if output.finish_reason else None
                finished += reason is not None
                choice = outputs[output.index]
                parts = choice.feed(output.text, final=reason is not None)
                if reason == "stop" and choice.num_tool_calls:
                    reason = "tool_calls"
                if output.index == 0:
                    cached = output.num_cached_tokens
                yield ChatDelta(
                    parts.content, Usage(output.num_prompt_tokens, cached, sum(completion),
                                         sum(reasoning)),
                    reason, output.index, self._logprobs(output) if output.logprobs else None,
                    parts.reasoning, parts.tool_calls)
        finally:
            if finished < n:
                self.engine.abort(request_id)

    def _logprobs(self, output: EngineOutput) -> tuple[TokenLogprobs, ...]:
        entries = []
        for token, logprob in output.logprobs:
            text, raw = self._token_text(token)
            top = tuple((*self._token_text(alt), value) for alt, value in logprob.top)
            entries.append(TokenLogprobs(text, raw, logprob.logprob, top))
        return tuple(entries)

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.runner.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def tokenizer(self) -> LocalTokenizer:
        return LocalTokenizer(self)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)
        if self.engine.stopped:  # never free the model under a step still running
            self.runner.close()
