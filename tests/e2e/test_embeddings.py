"""POST /v1/embeddings through the official SDK against the session server, which serves
the built-in all-MiniLM-L6-v2 by default, priced at 1 micro-unit per input token."""

from __future__ import annotations

import array
import base64
import math

import httpx
import openai
import pytest

from tests.e2e.conftest import INPUT_MICROS_PER_TOKEN
from tests.e2e.server import RunningServer

MODEL = "all-minilm-l6-v2"
TEXTS = ["The cat sits on the mat.", "A cat is sitting on a rug.",
         "Quarterly revenue grew by eight percent."]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b))


def test_floats_rank_a_paraphrase_above_an_unrelated_sentence(
        client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model=MODEL, input=TEXTS)
    assert answer.object == "list" and answer.model == MODEL
    assert [(d.object, d.index) for d in answer.data] == [("embedding", i) for i in range(3)]
    cat, rug, revenue = (d.embedding for d in answer.data)
    assert len(cat) == 384 and math.isclose(cosine(cat, cat), 1.0, abs_tol=1e-5)
    assert math.isclose(sum(x * x for x in cat), 1.0, abs_tol=1e-4)  # normalized
    assert cosine(cat, rug) > 0.6 > 0.2 > cosine(cat, revenue)
    # [CLS] and [SEP] around each input: 9 + 10 + 9 tokens
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (28, 28)


def test_base64_holds_the_same_vectors(client: openai.OpenAI) -> None:
    # Without encoding_format the SDK asks for base64 and decodes it into floats itself;
    # asked for explicitly, base64 comes back as the string.
    default = client.embeddings.create(model=MODEL, input=TEXTS[0])
    floats = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    packed = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="base64")
    raw = packed.data[0].embedding
    assert isinstance(raw, str)
    decoded = array.array("f", base64.b64decode(raw)).tolist()
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert decoded == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_token_ids_are_embedded_as_given(client: openai.OpenAI) -> None:
    text = client.embeddings.create(model=MODEL, input="hello world")
    ids = client.embeddings.create(model=MODEL, input=[[101, 7592, 2088, 102]])
    assert ids.usage.prompt_tokens == text.usage.prompt_tokens == 4
    assert ids.data[0].embedding == pytest.approx(text.data[0].embedding, abs=1e-6)


def test_the_account_pays_the_input_price_per_token(server: RunningServer) -> None:
    key = server.create_key("embedder", balance="1")
    before = server.admin("GET", "/accounts/embedder")["balance_micros"]
    with openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0) as sdk:
        answer = sdk.embeddings.create(model=MODEL, input=TEXTS * 10)
    after = server.admin("GET", "/accounts/embedder")
    assert answer.usage.prompt_tokens == 280
    assert before - after["balance_micros"] == 280 * INPUT_MICROS_PER_TOKEN
    assert after["reserved_micros"] == 0


def test_refusals(client: openai.OpenAI, server: RunningServer, api_key: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-embedder", input="x")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as long:
        client.embeddings.create(model=MODEL, input="word " * 600)
    assert long.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as dimensions:
        client.embeddings.create(model=MODEL, input="x", dimensions=128)
    assert dimensions.value.body["param"] == "dimensions"  # type: ignore[index]
    # the /api alias, and an empty input (the SDK sends what it is given)
    answer = httpx.post(f"{server.base_url}/api/v1/embeddings", timeout=30,
                        headers={"Authorization": f"Bearer {api_key}"},
                        json={"model": MODEL, "input": []})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "input"


def test_the_model_is_listed(client: openai.OpenAI) -> None:
    entry = next(model for model in client.models.list() if model.id == MODEL).model_dump()
    assert client.models.retrieve(MODEL).model_dump() == entry
    assert (entry["task"], entry["dimensions"], entry["context_length"]) == (
        "embedding", 384, 512)
    assert entry["pricing"]["input"] == float(INPUT_MICROS_PER_TOKEN)
