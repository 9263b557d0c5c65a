"""The embeddings request model's edges, the answer's encodings, and the built-in and
upstream providers' refusals, without a model."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from modelyard.api.embeddings import MAX_INPUT_CHARS, MAX_INPUTS, _parse, answer_body
from modelyard.api.errors import APIError
from modelyard.engine.embedder import Embedder, Vectors
from modelyard.providers.base import ProviderError
from modelyard.providers.embeddings import (
    EmbeddingRequest,
    Embeddings,
    LocalEmbeddings,
    utf8_bound,
)
from modelyard.providers.upstream_embeddings import _read_answer

MODEL = "all-minilm-l6-v2"


def parse(input_value: Any, **fields: Any) -> Any:
    return _parse(orjson.dumps({"model": MODEL, "input": input_value, **fields}))


def refusal(body: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        _parse(body)
    return caught.value


def refused(input_value: Any, **fields: Any) -> APIError:
    # json, not orjson: it writes integers beyond 64 bits as a hostile client would
    return refusal(json.dumps({"model": MODEL, "input": input_value, **fields}).encode())


@pytest.mark.parametrize(("value", "inputs"), [
    ("one", ("one",)),
    (["a", "b"], ("a", "b")),
    ([1, 2, 3], ((1, 2, 3),)),
    ([[1], [2, 3]], ((1,), (2, 3))),
    (["\u0661\u0662\u0663"], ("\u0661\u0662\u0663",)),  # Arabic-Indic digits are text
    (["a\u0000b"], ("a\u0000b",)),  # a NUL is text too (the tokenizer sees its bytes)
    (["x" * MAX_INPUT_CHARS], ("x" * MAX_INPUT_CHARS,)),
    ([0, 2**31 - 1], ((0, 2**31 - 1),)),
])
def test_accepted_inputs(value: Any, inputs: tuple[Any, ...]) -> None:
    assert parse(value).to_request("r").inputs == inputs


@pytest.mark.parametrize(("value", "status", "param"), [
    ("", 422, "input"),
    ([], 422, "input"),
    ([""], 422, "input"),
    ([[]], 422, "input"),
    ([-1], 422, "input"),
    ([2**31], 422, "input"),
    ([10**40], 422, "input"),
    ([[1], [-5]], 422, "input"),
    (["x" * (MAX_INPUT_CHARS + 1)], 422, "input"),
    (["a"] * (MAX_INPUTS + 1), 422, "input"),
    ([[1]] * (MAX_INPUTS + 1), 422, "input"),
    (7, 400, "input"),
    ([1.5], 400, "input[0]"),
    ([True], 400, "input[0]"),
    (["a", 1], 400, "input[1]"),
    ([[[1]]], 400, "input[0]"),
    ({"text": "a"}, 400, "input"),
    (None, 400, "input"),
])
def test_refused_inputs(value: Any, status: int, param: str) -> None:
    error = refused(value)
    assert (error.status, error.param) == (status, param), error.message


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    error = refusal(b'{"model": "m", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert error.status == 400


@pytest.mark.parametrize(("fields", "param"), [
    ({"encoding_format": "binary"}, "encoding_format"),
    ({"dimensions": 0}, "dimensions"),
    ({"dimensions": 10**9}, "dimensions"),
])
def test_refused_fields(fields: dict[str, Any], param: str | None) -> None:
    error = refused("a", **fields)
    assert error.status in (400, 422)
    if param is not None:
        assert error.param == param


def test_a_missing_input_is_named() -> None:
    error = refusal(b'{"model": "m"}')
    assert (error.status, error.param) == (400, "input")


def test_float_and_base64_answers_hold_the_same_vectors() -> None:
    vectors = np.array([[0.1, -0.5, 3.25], [1e-8, 0.0, -2.0]], dtype=np.float32)
    result = Embeddings(vectors, prompt_tokens=7)
    floats = json.loads(orjson.dumps(answer_body(MODEL, result, "float")))
    packed = json.loads(orjson.dumps(answer_body(MODEL, result, "base64")))
    assert floats["object"] == "list" and floats["model"] == MODEL
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    for answer in (floats, packed):
        assert [(d["object"], d["index"]) for d in answer["data"]] == [
            ("embedding", 0), ("embedding", 1)]
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
               for d in packed["data"]]
    assert np.array_equal(np.stack(decoded), vectors)
    assert np.array_equal(np.array([d["embedding"] for d in floats["data"]], np.float32),
                          vectors)


class FakeTokenizer:
    n_vocab = 100
    max_input_tokens = 8

    def tokenize(self, text: str) -> list[int]:
        return [1, *(min(ord(c), 99) for c in text), 2]


class FakeEncoder:
    dimensions = 4
    max_sequences = 16

    def encode(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        rows = np.array([[len(t), 1, 1, 1] for t in inputs], dtype=np.float32)
        normalized: Vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return normalized

    def close(self) -> None:
        pass


def local_run(request: EmbeddingRequest, truncatable: bool = False) -> Embeddings:
    async def main() -> Embeddings:
        embedder = Embedder(FakeEncoder(), batch_tokens=64)
        model = LocalEmbeddings(MODEL, FakeTokenizer(), embedder, truncatable=truncatable)
        try:
            return await model.embed(await model.prepare(request))
        finally:
            await model.close()
    return asyncio.run(main())


def local_refusal(request: EmbeddingRequest, truncatable: bool = False) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        local_run(request, truncatable)
    return caught.value


def test_the_built_in_model_counts_what_it_embeds() -> None:
    result = local_run(EmbeddingRequest("r", ("ab", "abcd")))
    assert result.prompt_tokens == 4 + 6
    assert result.vectors.shape == (2, 4)


def test_the_built_in_model_refuses_what_it_cannot_embed() -> None:
    too_long = local_refusal(EmbeddingRequest("r", ("ok", "x" * 7)))
    assert (too_long.status, too_long.param, too_long.code) == (
        422, "input", "context_length_exceeded")
    assert "input[1] has 9 tokens" in too_long.message
    outside = local_refusal(EmbeddingRequest("r", ((1, 2), (5, 100))))
    assert (outside.status, outside.param) == (422, "input")
    dimensions = local_refusal(EmbeddingRequest("r", ("a",), dimensions=2))
    assert (dimensions.status, dimensions.param) == (422, "dimensions")


def test_its_own_dimensions_are_always_allowed_and_truncation_renormalizes() -> None:
    assert local_run(EmbeddingRequest("r", ("a",), dimensions=4)).vectors.shape == (1, 4)
    cut = local_run(EmbeddingRequest("r", ("a",), dimensions=2), truncatable=True).vectors
    assert cut.shape == (1, 2) and np.isclose(np.linalg.norm(cut), 1.0)
    wider = local_refusal(EmbeddingRequest("r", ("a",), dimensions=5), truncatable=True)
    assert wider.param == "dimensions"


def test_an_upstream_bound_covers_any_tokenizer() -> None:
    assert utf8_bound(["ab", "\u00e9"]) == 2 + 8 + 2 + 8


def test_an_upstream_answer_is_read_by_index_in_either_encoding() -> None:
    packed = base64.b64encode(np.array([0.5, 0.25], "<f4").tobytes()).decode()
    raw = orjson.dumps({"data": [{"index": 1, "embedding": packed},
                                 {"index": 0, "embedding": [1.0, 0.0]}],
                        "usage": {"prompt_tokens": 5, "total_tokens": 5}})
    result = _read_answer(raw, 2, 100)
    assert result.vectors.tolist() == [[1.0, 0.0], [0.5, 0.25]]
    assert (result.prompt_tokens, result.estimated) == (5, False)
    unreported = _read_answer(orjson.dumps({"data": [{"index": 0, "embedding": [1.0]}]}),
                              1, 9)
    assert (unreported.prompt_tokens, unreported.estimated) == (9, True)


@pytest.mark.parametrize("answer", [
    b"not json",
    b'{"data": []}',
    b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]}',
    b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]}',
    b'{"data": [{"index": 0, "embedding": "!!"}, {"index": 1, "embedding": [1.0]}]}',
    b'{"data": [{"index": 0, "embedding": [true]}, {"index": 1, "embedding": [1.0]}]}',
    b'{"data": [{"index": 5, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}]}',
])
def test_a_malformed_upstream_answer_is_refused(answer: bytes) -> None:
    with pytest.raises(ValueError):
        _read_answer(answer, 2, 10)
