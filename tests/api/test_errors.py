"""One error base, mapped to SPEC.md's shape in one place (`as_api_error`)."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re

import pytest

import modelyard
from modelyard.api.errors import APIError, as_api_error
from modelyard.errors import ModelyardError
from modelyard.platform.accounts import AdminError
from modelyard.platform.gate import PlatformError
from modelyard.providers.base import ProviderError, StreamError
from modelyard.providers.http1 import DeadlineExceeded, HTTPError

INTERNAL = re.compile(r"internal server error \(request ([0-9a-f]{32})\)")


def test_every_exception_class_of_modelyard_derives_from_the_one_base() -> None:
    classes = set()
    for module_info in pkgutil.walk_packages(modelyard.__path__, "modelyard."):
        if ".migrations" in module_info.name:
            continue  # alembic's scripts, loaded by alembic alone
        module = importlib.import_module(module_info.name)
        classes |= {value for value in vars(module).values()
                    if inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__.startswith("modelyard.")}
    assert len(classes) >= 20
    stray = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes
                   if not issubclass(c, ModelyardError))
    assert stray == []


def test_a_refusal_is_answered_with_its_own_status_message_code_and_headers() -> None:
    error = as_api_error(ProviderError(503, "the server is overloaded; retry shortly",
                                       code="server_overloaded", retry_after=3))
    assert (error.status, error.headers) == (503, {"Retry-After": "3"})
    assert error.body() == {"error": {"message": "the server is overloaded; retry shortly",
                                      "type": "server_overloaded", "param": None,
                                      "code": "server_overloaded"}}
    limited = as_api_error(PlatformError(429, "slow down", code="rate_limit_exceeded",
                                         param="model", headers={"Retry-After": "7"}))
    assert (limited.status, limited.param, limited.headers) == (429, "model",
                                                                {"Retry-After": "7"})
    assert limited.body()["error"]["type"] == "rate_limit_error"
    assert as_api_error(AdminError(409, "taken")).body()["error"]["code"] == "conflict"
    assert as_api_error(AdminError(404, "no such")).body()["error"]["code"] == "not_found"
    raised = APIError(422, "bad", param="n", code="invalid_value")
    assert as_api_error(raised) is raised


def test_a_failure_modelyard_words_itself_is_a_500_the_client_reads() -> None:
    error = as_api_error(StreamError("the upstream deployment stopped answering"))
    assert error.status == 500
    assert error.body()["error"] == {"message": "the upstream deployment stopped answering",
                                     "type": "server_error", "param": None,
                                     "code": "server_error"}


@pytest.mark.parametrize("exc", [
    HTTPError("cannot connect to 10.9.8.7:8000: secret"),
    DeadlineExceeded("secret deadline"),
    RuntimeError("secret internals"),
    ModelyardError("secret", status=422, code="invalid_value"),  # not exposed: internal
])
def test_an_internal_error_is_a_500_naming_only_a_request_id(
        exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="modelyard.api.errors"):
        error = as_api_error(exc)
    assert (error.status, error.headers) == (500, {})
    body = error.body()["error"]
    match = INTERNAL.fullmatch(body["message"])
    assert match is not None and body["code"] == "server_error" and body["param"] is None
    assert "secret" not in str(body)
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info is not None and logged[0].exc_info[1] is exc
