"""Schemathesis against /v1/openapi.json: whatever it sends, the API answers
without a server error and within the statuses, content types and bodies its
schema documents.

One live Daphne for the module, with its own database and an API key. The
runs are bounded (a few examples per operation, no shrinking) and the
completions stay cheap: valid model names become the bundled model's and
valid token counts a few tokens, so a generated request runs the real model
briefly (invalid values are left as they are).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import v1
from tests.api_helpers import MODEL, LiveApi, live_api

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# Each generating endpoint's token limit.
LIMITS = {"/v1/responses": ("max_output_tokens",)}
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(tmp_path_factory.mktemp("schemathesis")) as live:
        yield live


# Loaded from the API object at collection, since schemathesis makes one test
# per operation from it (its lazy fixture loader does not run on pytest 9);
# test_it_serves_the_schema_it_is_tested_against checks that
# /v1/openapi.json serves this very document.
DOCUMENT: dict[str, Any] = json.loads(json.dumps(v1.api.get_openapi_schema(path_prefix="/v1/")))
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=SchemathesisConfig.from_dict(
        {
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "generation": {"max-examples": 8, "no-shrink": True, "database": "none"},
            # No .schemathesis/ directory in the checkout.
            "cache": {"enabled": False},
            "operations": [
                {
                    # The coverage phase's valid bodies (hundreds: every field
                    # at its bounds) would each run the model; its invalid
                    # ones, refused before the model, are kept. Fuzzing sends
                    # a few valid bodies.
                    "include-path": list(GENERATING),
                    "phases": {
                        "coverage": {"generation": {"mode": "negative"}},
                        "fuzzing": {"generation": {"max-examples": 4}},
                    },
                }
            ],
        }
    ),
)


def test_it_serves_the_schema_it_is_tested_against(api: LiveApi) -> None:
    assert requests.get(api.url + "/v1/openapi.json", timeout=30).json() == DOCUMENT


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Say hi."}], "stream_options": {"include_usage": True}},
        ),
        ("/v1/completions", {"prompt": "Once upon a time", "echo": True}),
    ],
)
def test_it_streams_the_chunks_its_schema_documents(api: LiveApi, path: str, body: dict[str, Any]) -> None:
    # Generated requests seldom stream: each event of a real stream is
    # checked against the document (a chunk, then [DONE]).
    streamed = requests.post(
        api.url + path,
        json={"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, **body},
        headers={"Authorization": f"Bearer {api.keys['alice']}"},
        timeout=120,
    )
    assert streamed.status_code == 200
    assert streamed.text.rstrip().endswith("data: [DONE]")
    schema[path]["POST"].validate_response(Response.from_requests(streamed, verify=True))


def cheap(case: Any) -> None:
    """Point a generated completion at the bundled model and keep it short
    (only valid values are replaced, by valid ones: an invalid case stays so)."""
    body = case.body
    if case.path == "/v1/embeddings" and isinstance(body, dict):
        # Valid lists of inputs stay valid, and few (each input runs the model).
        if isinstance(body.get("model"), str) and 0 < len(body["model"]) <= 100:
            body["model"] = MODEL
        if isinstance(body.get("input"), list) and len(body["input"]) > 2:
            body["input"] = body["input"][:2]
        return
    if case.path not in GENERATING or not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and 0 < len(model) <= 100:
        body["model"] = MODEL
    fields = LIMITS.get(case.path, ("max_tokens", "max_completion_tokens"))
    for field in fields:
        value = body.get(field)
        # 14732.0 is an integer to the API too.
        if isinstance(value, int | float) and not isinstance(value, bool) and MAX_TOKENS < value <= 32_768:
            body[field] = MAX_TOKENS
    body.setdefault(fields[0], MAX_TOKENS)


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@schema.parametrize()
def test_it_answers_generated_requests_as_its_schema_says(case: Any, api: LiveApi) -> None:
    cheap(case)
    case.call_and_validate(
        base_url=api.url,
        headers={"Authorization": f"Bearer {api.keys['alice']}"},
        checks=CHECKS,
        timeout=120,
    )
