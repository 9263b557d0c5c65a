"""A real agent loop through the Responses API: the OpenAI Agents SDK runs an agent with
one function tool against the session's server (tracing off: nothing leaves loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer


def _agent(client: openai.AsyncOpenAI, cities: list[str]) -> Agent:
    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        # a sentence, which the small model passes on (given JSON, it calls the tool again)
        return f"It is sunny and 21 degrees Celsius in {city}."

    return Agent(
        name="weather", tools=[get_weather],
        instructions="You answer questions about the weather. Use the get_weather tool, "
                     "then answer in one sentence.",
        model=OpenAIResponsesModel(MODEL, client),
        # the small default model: a tool call must come first (reset after it)
        model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0))


async def _run(server: RunningServer, api_key: str, question: str,
               streamed: bool) -> tuple[Any, list[str], list[str]]:
    set_tracing_disabled(True)
    cities: list[str] = []
    async with openai.AsyncOpenAI(base_url=server.api_url, api_key=api_key, max_retries=0,
                                  timeout=120) as client:
        agent = _agent(client, cities)
        if not streamed:
            return await Runner.run(agent, question, max_turns=4), cities, []
        run = Runner.run_streamed(agent, question, max_turns=4)
        kinds = [event.type async for event in run.stream_events()]
        return run, cities, kinds


def test_agent_loop(server: RunningServer, api_key: str) -> None:
    result, cities, _ = asyncio.run(_run(server, api_key, "What is the weather in Paris?",
                                         streamed=False))
    assert cities == ["Paris"]
    assert isinstance(result.final_output, str) and result.final_output.strip()
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"
    assert len(result.raw_responses) >= 2
    assert all(raw.usage.output_tokens > 0 for raw in result.raw_responses)


def test_streamed_agent_loop(server: RunningServer, api_key: str) -> None:
    result, cities, kinds = asyncio.run(_run(server, api_key, "What is the weather in Oslo?",
                                             streamed=True))
    assert cities == ["Oslo"] and str(result.final_output).strip()
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
