"""Fuzzing the API from its own OpenAPI document (schemathesis): chat completions, the
model list and every admin route, with data that fits the schema and data that does not,
against a real server whose priced model is served by the fault upstream.

Every answer must be below 500, every error in SPEC.md's shape, every 200 of the chat
route a whole answer; afterwards the ledger must add up with no reservation left. The
chat route's body is fuzzed with `model` pinned to the priced model, so that the requests
that fit the schema really run and are billed. A budget of examples per operation keeps
the run short; MODELYARD_ADVERSARIAL_LONG=1 runs many more.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.generation.case import Case

from tests.adversarial.harness import (
    LONG,
    anthropic_error_problems,
    error_shape_problems,
    fault_model,
    record,
)
from tests.adversarial.ledger_invariant import wait_for_ledger
from tests.e2e.server import RunningServer, running_server
from tests.router.fault_process import running_fault_server

MODEL = "fault/instant"
EXAMPLES = 150 if LONG else 15
"""Examples per operation and kind (twice that for the chat body that fits the schema, a
fifth for the /api/v1 aliases of routes fuzzed under /v1 too)."""
CHAT = ["/v1/chat/completions", "/api/v1/chat/completions"]
COMPLETIONS = ["/v1/completions", "/api/v1/completions"]
GENERATING = CHAT + COMPLETIONS
MESSAGES = ["/v1/messages"]
"""Anthropic's Messages API: its errors in Anthropic's shape, its model pinned too."""
ANTHROPIC = [*MESSAGES, "/v1/messages/count_tokens"]
EMBEDDINGS = ["/v1/embeddings", "/api/v1/embeddings"]
RESPONSES = ["/v1/responses"]
"""OpenAI's Responses API: its model pinned, its events checked."""
EMBEDDING_MODEL = "all-minilm-l6-v2"
"""The built-in embedding model, which the fuzzed server runs by default."""
OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/api/v1/chat/completions"),
    ("POST", "/v1/completions"), ("POST", "/api/v1/completions"),
    ("GET", "/v1/models"), ("GET", "/api/v1/models"),
    ("GET", "/v1/models/{model}"), ("GET", "/api/v1/models/{model}"),
    ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("POST", "/v1/embeddings"), ("POST", "/api/v1/embeddings"),
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("GET", "/admin/accounts"), ("POST", "/admin/accounts"),
    ("GET", "/admin/accounts/{name}"), ("POST", "/admin/accounts/{name}/topup"),
    ("POST", "/admin/accounts/{name}/weight"),
    ("GET", "/admin/keys"), ("POST", "/admin/keys"), ("POST", "/admin/keys/{key_id}/revoke"),
    ("GET", "/admin/usage"), ("GET", "/admin/usage/records"),
]
UNFUZZED = {("GET", "/health"), ("GET", "/metrics")}
SEEN: Counter[str] = Counter()


RUNNABLE_MESSAGES = {
    "type": "array", "minItems": 1, "maxItems": 4,
    "items": {"type": "object", "additionalProperties": False, "required": ["role", "content"],
              "properties": {"role": {"enum": ["system", "developer", "user"]},
                             "content": {"type": "string", "minLength": 1, "maxLength": 200}}}}
"""Messages the model validators accept (content present): so that most requests that fit
the schema pass validation and run, with every other field fuzzed as described."""
RUNNABLE_ANTHROPIC_MESSAGES = {
    "type": "array", "minItems": 1, "maxItems": 4,
    "items": {"type": "object", "additionalProperties": False, "required": ["role", "content"],
              "properties": {"role": {"enum": ["user"]},
                             "content": {"type": "string", "minLength": 1, "maxLength": 200}}}}


class Fuzzed:
    def __init__(self, server: RunningServer, key: str, document: dict[str, Any]) -> None:
        self.server = server
        self.key = key
        self.document = document
        self.schemas = {"described": schemathesis.openapi.from_dict(_pinned(document)),
                        "runnable": schemathesis.openapi.from_dict(
                            _pinned(document, RUNNABLE_MESSAGES))}
        self.session = requests.Session()

    def auth(self, path: str) -> dict[str, str]:
        key = self.server.admin_key if path.startswith("/admin/") else self.key
        return {"Authorization": f"Bearer {key}"}


def _pinned(document: dict[str, Any], messages: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document with the chat body's `model` pinned to the priced model (and its
    `messages` to `messages`)."""
    pinned = copy.deepcopy(document)
    for path in GENERATING:
        body = pinned["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"] = {"type": "string", "enum": [MODEL]}
        if messages is not None and path in CHAT:
            body["schema"]["properties"]["messages"] = messages
    for path in ANTHROPIC:
        body = pinned["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"] = {"type": "string", "enum": [MODEL]}
        if messages is not None:
            body["schema"]["properties"]["messages"] = RUNNABLE_ANTHROPIC_MESSAGES
    for path in EMBEDDINGS:
        body = pinned["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"] = {"type": "string", "enum": [EMBEDDING_MODEL]}
    for path in RESPONSES:
        body = pinned["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"] = {"type": "string", "enum": [MODEL]}
        if messages is not None:
            body["schema"]["properties"]["input"] = RUNNABLE_MESSAGES
    return pinned


@pytest.fixture(scope="module")
def fuzzed(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    workdir = tmp_path_factory.mktemp("fuzz")
    with running_fault_server() as fault, \
            running_server(data_dir, fault_model(MODEL, "ok:FZ", fault), workdir) as server:
        key = server.create_key("fuzz", balance="1000")
        document = httpx.get(f"{server.base_url}/openapi.json", timeout=10,
                             headers={"Authorization": f"Bearer {server.admin_key}"}).json()
        target = Fuzzed(server, key, document)
        yield target
        target.session.close()
        record(requests_fuzzed=SEEN["requests"], fuzz_5xx=SEEN["5xx"],
               fuzz_bad_errors=SEEN["bad errors"])


def test_the_openapi_document_describes_every_route_and_the_chat_body(
        fuzzed: Fuzzed) -> None:
    described = {(method.upper(), path) for path, item in fuzzed.document["paths"].items()
                 for method in item}
    assert described == set(OPERATIONS) | UNFUZZED  # a new route must be fuzzed too
    for path in CHAT:
        body = fuzzed.document["paths"][path]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        assert {"model", "messages", "tools", "logit_bias", "user"} <= set(schema["properties"])
        assert set(schema["required"]) == {"model", "messages"}
        assert "$ref" not in str(schema)  # inlined: refs would point at the document root


def _check(case: Case[Any], response: schemathesis.Response) -> None:
    SEEN["requests"] += 1
    status = response.status_code
    where = f"{case.method} {case.formatted_path} -> {status}: {case.body!r:.300}"
    if status >= 500:
        SEEN["5xx"] += 1
    assert status < 500, f"{where}\n{response.text[:500]}"
    if status >= 400:
        shape = anthropic_error_problems if case.path in ANTHROPIC else error_shape_problems
        problems = shape(status, response.content)
        SEEN["bad errors"] += bool(problems)
        assert not problems, f"{where}\n{problems}"
    elif case.path in GENERATING:
        SEEN["chat answered"] += 1
        if "text/event-stream" in " ".join(response.headers.get("content-type", [])):
            assert response.text.rstrip().endswith("data: [DONE]"), where
            assert 'data: {"error"' not in response.text, where
        else:
            assert response.json()["choices"], where
    elif case.path in MESSAGES:
        SEEN["chat answered"] += 1
        if "text/event-stream" in " ".join(response.headers.get("content-type", [])):
            assert response.text.rstrip().endswith('data: {"type":"message_stop"}'), where
            assert "event: error" not in response.text, where
        else:
            assert response.json()["type"] == "message", where
    elif case.path in RESPONSES and case.method == "POST":
        SEEN["chat answered"] += 1
        if "text/event-stream" in " ".join(response.headers.get("content-type", [])):
            last = response.text.rstrip().rsplit("\n\n", 1)[-1]
            assert last.startswith(("event: response.completed",
                                    "event: response.incomplete")), where
        else:
            assert response.json()["object"] == "response", where


VARIANTS = [("runnable", GenerationMode.POSITIVE), ("runnable", GenerationMode.NEGATIVE),
            ("described", GenerationMode.POSITIVE)]
CASES = [pytest.param(method, path, schema, mode, id=f"{method} {path} {label}")
         for method, path in OPERATIONS
         for (schema, mode), label in zip(VARIANTS, ("fits", "breaks", "as-described"),
                                          strict=True)
         if schema == "runnable" or path in GENERATING + MESSAGES + RESPONSES]


@pytest.mark.parametrize(("method", "path", "schema", "mode"), CASES)
def test_fuzz(fuzzed: Fuzzed, method: str, path: str, schema: str,
              mode: GenerationMode) -> None:
    operation = fuzzed.schemas[schema][path][method]
    if mode.is_negative and not _has_inputs(fuzzed.document, method, path):
        pytest.skip("nothing to break: no query parameter and no body")

    examples = EXAMPLES * 2 if path in GENERATING and schema == "runnable" and mode.is_positive \
        else EXAMPLES // 2 if schema == "described" else EXAMPLES
    if path.startswith("/api/v1/"):
        examples = max(3, examples // 5)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=not LONG,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Case[Any]) -> None:
        response = case.call(base_url=fuzzed.server.base_url, session=fuzzed.session,
                             headers=fuzzed.auth(path), timeout=30)
        _check(case, response)

    fuzz()


def _has_inputs(document: dict[str, Any], method: str, path: str) -> bool:
    item = document["paths"][path][method.lower()]
    return "requestBody" in item or any(p.get("in") == "query"
                                        for p in item.get("parameters", ()))


def test_the_ledger_adds_up_after_the_fuzz(fuzzed: Fuzzed) -> None:
    assert fuzzed.server.process.poll() is None, "the server died"
    database = Path(fuzzed.server.log_path).parent / "platform.db"
    ledger = wait_for_ledger(f"sqlite:///{database}", wait_s=10)
    record(money_unaccounted=ledger.money_unaccounted)
    assert not ledger.violations, ledger.violations
    assert ledger.account("fuzz").usage_records >= SEEN["chat answered"] > 0, \
        "the fuzzed chat requests that were answered were not all billed"
