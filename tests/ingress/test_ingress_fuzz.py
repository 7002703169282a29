"""Schemathesis against the live ingress: no 5xx, and every answer as documented.

The schema is read from the running process's ``/openapi.json``
(``schemathesis.openapi.from_url``) and run the way ``schemathesis run``
runs it: examples, coverage, fuzzing and stateful phases, every built-in
check (not a server error, documented status codes, content types and
headers, bodies matching their schemas, auth enforced, invalid data refused,
valid data accepted, unsupported methods answered 405), over HTTP with a
real bearer token.

Path ids are pinned to a channel, message and conversation that exist, so
generated requests reach the code behind the 404s. ``CHANNELS_FUZZ_EXAMPLES``
sets the examples per operation (default 20, well under a minute here) and
``CHANNELS_FUZZ_TIMEOUT`` the test's timeout in seconds (default 300); a
longer run is ``make fuzz``.

Why the engine and not ``@schema.parametrize()``: the schema only exists once
the ingress process runs, which needs the lazy loader
(``schemathesis.pytest.from_fixture``), and schemathesis 4.32's lazy loader
reads ``request.node._nodeid``, which pytest 9 no longer has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import schemathesis
from e2e.conftest import Stack
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.engine import Status, events, from_schema

from channels_core.primitives import Conversation, Message

from .conftest import Caller, Ingress, http_channel, manager, tag

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(int(os.environ.get("CHANNELS_FUZZ_TIMEOUT", "300"))),
]

EXAMPLES = int(os.environ.get("CHANNELS_FUZZ_EXAMPLES", "20"))


@dataclass
class Target:
    ingress: Ingress
    caller: Caller
    channel_id: int
    message_id: int
    conversation_id: int


@pytest.fixture
async def target(live: Stack, ingress: Ingress) -> Target:
    who = await manager()
    channel = await http_channel()
    conversation = await Conversation().set_title(f"fuzz {tag()}").save()
    message = Message(f"fuzz {tag()}", author_id=who.id).set_conversation_id(conversation.id)
    await message.send(channel)
    assert channel.id and message.id and conversation.id
    return Target(ingress, who, channel.id, message.id, conversation.id)


def _schema(target: Target) -> schemathesis.BaseSchema:
    config = SchemathesisConfig.from_dict(
        {
            "headers": target.caller.headers,
            "parameters": {
                "channel_id": target.channel_id,
                "message_id": target.message_id,
                "conversation_id": target.conversation_id,
            },
            # No .hypothesis/ directory left in the working tree.
            "generation": {"max-examples": EXAMPLES, "database": "none"},
            "request-timeout": 30,
        }
    )
    return schemathesis.openapi.from_url(f"{target.ingress.base_url}/openapi.json", config=config)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(target: Target) -> None:
    schema = _schema(target)
    operations = set()
    for loaded in schema.get_all_operations():
        assert isinstance(loaded, Ok), loaded
        operations.add(loaded.ok().label)
    failures: list[str] = []
    errors: list[str] = []
    exercised: set[str] = set()
    requests = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            recorder = event.recorder
            requests += len(recorder.interactions)
            if recorder.interactions:
                exercised.add(recorder.label)
            for checks in recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(
                            f"{recorder.label}: {check.name}: {failure.title}\n"
                            f"{failure.message}\n{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {event.exception!r}")

    assert errors == [], "\n\n".join(errors)
    # Each distinct failure once: hypothesis finds the same one many times.
    assert not failures, "\n\n".join(sorted(set(failures)))
    # Not vacuous: every documented operation got requests.
    assert len(operations) == 11
    assert {label for label in exercised if label in operations} == operations
    assert requests >= len(operations) * 10
