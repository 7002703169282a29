"""What ``/openapi.json`` promises, checked on the app itself (no server, no database).

The live document is what schemathesis fuzzes (``test_ingress_fuzz.py``);
these checks pin the choices that make it true: problem+json errors, the
domain's own body model, bearer auth on everything but health and metrics.
"""

from __future__ import annotations

from typing import Any

import pytest

from channels_core.settings import get_settings
from channels_core.transports.ingress_http import SubmitBody, SubscribeBody
from producer.ingress import PROBLEM_JSON, create_app

OPEN = {("get", "/healthz"), ("get", "/metrics")}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app().openapi()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, methods in spec["paths"].items()
        for method, op in methods.items()
    ]


def test_every_error_response_is_a_problem_document(spec: dict[str, Any]) -> None:
    errors = 0
    for method, path, op in _operations(spec):
        for code, response in op["responses"].items():
            if int(code) >= 400:
                errors += 1
                assert response["content"] == {
                    PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (method, path, code)
    assert errors >= 30
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    problem = spec["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}


def test_request_bodies_are_the_models_the_domain_validates(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    body = dict(schemas["SubmitBody"])
    offered = body["properties"]["content_type"].pop("enum")
    assert offered == sorted(get_settings().allowed_content_types)
    assert body == SubmitBody.model_json_schema()
    assert schemas["SubscribeBody"] == SubscribeBody.model_json_schema()
    submit = spec["paths"]["/channels/{channel_id}/messages"]["post"]
    assert submit["requestBody"] == {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}}},
    }
    statuses = {"200", "201", "401", "403", "404", "409", "413", "415", "422"}
    assert set(submit["responses"]) == statuses


def test_everything_but_health_and_metrics_needs_a_bearer_token(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token from `channels principal token PRINCIPAL`.",
    }
    for method, path, op in _operations(spec):
        if (method, path) in OPEN:
            assert "security" not in op and "401" not in op["responses"]
        else:
            assert op["security"] == [{"bearer": []}] and "401" in op["responses"], (method, path)
    assert len(_operations(spec)) == 11
