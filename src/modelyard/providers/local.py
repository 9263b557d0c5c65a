"""The built-in engine as a Provider: chat template, tokenization, context limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from modelyard.chat.template import ChatTemplate, TemplateError
from modelyard.config import Config
from modelyard.engine.engine import Engine
from modelyard.engine.metrics import EngineMetrics
from modelyard.engine.runner import LlamaRunner, RunnerConfig
from modelyard.engine.scheduler import QueueFullError, SchedulerConfig
from modelyard.engine.sequence import SamplingParams
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    PreparedChat,
    Provider,
    ProviderError,
    StreamError,
)

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
RETRY_AFTER_SECONDS = 2


class LocalProvider(Provider):
    def __init__(self, config: Config, model_path: Path,
                 metrics: EngineMetrics | None = None) -> None:
        engine_config = config.engine
        self.model_id = config.model.id
        self.default_max_tokens = config.model.default_max_tokens
        self.context_per_sequence = engine_config.context_per_sequence
        n_ctx = engine_config.max_sequences * engine_config.context_per_sequence
        self.runner = LlamaRunner(RunnerConfig(
            model_path=model_path,
            n_seq_max=engine_config.max_sequences,
            n_ctx=n_ctx,
            n_batch=engine_config.step_token_budget,
            threads=engine_config.threads,
            gpu_layers=engine_config.gpu_layers,
            flash_attention=engine_config.flash_attention,
        ))
        self.template = ChatTemplate(
            self.runner.chat_template(),
            bos_token=self.runner.token_text(self.runner.bos_id),
            eos_token=self.runner.token_text(self.runner.eos_id),
        )
        self.engine = Engine(self.runner, SchedulerConfig(
            max_sequences=engine_config.max_sequences,
            step_token_budget=engine_config.step_token_budget,
            kv_capacity=n_ctx,
            context_per_sequence=engine_config.context_per_sequence,
            max_waiting=engine_config.max_waiting,
            prefix_caching=engine_config.prefix_caching,
        ), metrics)
        self.engine.start()

    def describe(self) -> dict[str, Any]:
        return {
            "context_length": self.context_per_sequence,
            "capabilities": {"tools": False, "json_schema": False, "reasoning": False,
                             "vision": False},
            "pricing": {"input": 0, "cached_input": 0, "output": 0},
        }

    def tokenize_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            prompt = self.template.render(messages)
        except TemplateError as exc:
            raise ProviderError(422, str(exc), param="messages", code="invalid_value") from exc
        add_bos = self.runner.add_bos and not (
            self.template_starts_with_bos(prompt)
        )
        return self.runner.tokenize(prompt, add_special=add_bos)

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
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if request.temperature is None
            else request.temperature,
            top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
            max_tokens=max_tokens,
            stop=request.stop,
            seed=request.seed,
        )

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat:
        prompt_ids = self.tokenize_prompt(request.messages)
        params = self.sampling_params(request, len(prompt_ids))
        return PreparedChat(request, len(prompt_ids), params.max_tokens, (prompt_ids, params))

    async def start_chat(self, prepared: PreparedChat) -> AsyncIterator[ChatDelta]:
        prompt_ids, params = prepared.work
        request = prepared.request
        try:
            queue = self.engine.submit(request.request_id, prompt_ids, params)
        except QueueFullError as exc:
            raise ProviderError(503, "the server is overloaded; retry shortly",
                                code="server_overloaded",
                                retry_after=RETRY_AFTER_SECONDS) from exc
        return self._stream(request.request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue[Any]) -> AsyncIterator[ChatDelta]:
        finished = False
        try:
            while True:
                output = await queue.get()
                if output.error is not None:
                    finished = True
                    raise StreamError(output.error)
                reason = output.finish_reason.value if output.finish_reason else None
                yield ChatDelta(output.text, output.num_prompt_tokens,
                                output.num_output_tokens, reason, output.num_cached_tokens)
                if reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.abort(request_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)
        self.runner.close()
