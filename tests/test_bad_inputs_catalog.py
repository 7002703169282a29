"""A catalog of bad inputs through every surface (issue 7): the HTTP ingress,
the ``channels`` CLI and the Python API, each refused with a clear answer
while no row of any table changes and nothing is enqueued.

Each case is one row of a table (``HTTP_CASES``, ``CLI_CASES``,
``PYTHON_CASES``) with a short id, the input in words and the answer it must
get: a problem+json 4xx, a CLI exit status with one ``Error:`` line, or a
typed ``channels_core.errors`` exception. ``CASES`` flattens them for the
issue note; print it as a markdown table with::

    python -m tests.test_bad_inputs_catalog

One small world is built per backend (SQLite, then the embedded PostgreSQL)
on an emptied database, so its ids are known: principal 1 alice (member:
channel.submit, channel.subscribe), principal 2 mallory (no roles), channel 1
General (alice subscribed), message 1 (alice's, sent over HTTP with
idempotency key ``k-1``). Every case takes a snapshot of every row of every
table and of the dispatcher's recorded jobs before and after.

The one column a refused request may move is ``api_tokens.last_used_at`` of the
token it presented: a valid token *was* used, even when what it asked for
is refused. Requests without a valid token (401) leave even that alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json as jsonlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from channels_core import db, tokens
from channels_core.dispatch import Batch, MemoryDispatcher, RouteJob, set_dispatcher
from channels_core.errors import (
    AuthenticationError,
    ConflictError,
    ContentTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from channels_core.models import Base, TokenRow
from channels_core.permissions import SUBMIT, SUBSCRIBE
from channels_core.primitives import Channel, Message, Permission, Principal, Role
from channels_core.registries import ChannelRegistry, MessageRegistry
from channels_core.sending import Dispatch
from channels_core.settings import configure, get_settings
from channels_core.transports.ingress_http import HttpIngress, IngressRefusedError

pytestmark = pytest.mark.timeout(60)

LIMIT = 262_144  # CHANNELS_MAX_CONTENT_BYTES' default: the cases rely on it
BODY_LIMIT = 2 * LIMIT + 64 * 1024  # producer.ingress.body_limit() at the default
TOO_LARGE = "x" * (LIMIT + 1)
HUGE = "x" * (4 * 1024 * 1024)  # over every limit of every surface
MISSING = 99
CRLF_EMAIL = "eve@example.com\r\nBcc: everyone@example.com"
CRLF_TYPE = "text/plain\r\nBcc: everyone@example.com"
PROBLEM = "application/problem+json"
# CHANNELS_CONTENT_TYPES' default, as the refusals list it.
ALLOWED = (
    "application/json, application/octet-stream, application/xml, image/jpeg, image/png, "
    "text/html, text/markdown, text/plain"
)
TITLES = {
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
}


# -- the world -------------------------------------------------------------------------------


@dataclass
class World:
    alice: Principal  # 1: channel.submit and channel.subscribe
    mallory: Principal  # 2: no roles
    channel: Channel  # 1: alice subscribed
    message: Message  # 1: alice's, submitted with idempotency key "k-1"
    dispatcher: MemoryDispatcher
    database_url: str
    tokens: dict[str, str] = field(default_factory=dict)  # alice, mallory, revoked, unknown


async def _empty() -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with db.session() as s, s.begin():
        if db.is_postgres():
            await s.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
            return
        for name in tables:
            await s.execute(text(f"DELETE FROM {name}"))
        await s.execute(text("DELETE FROM sqlite_sequence"))


@pytest.fixture(scope="module")
async def world(database_url: str) -> AsyncIterator[World]:
    """Built once per backend: refused inputs change nothing, so the cases can share it."""
    configure(database_url=database_url, egress_allow_cidrs="127.0.0.0/8")
    assert get_settings().max_content_bytes == LIMIT
    assert ", ".join(sorted(get_settings().allowed_content_types)) == ALLOWED
    await _empty()
    dispatcher = MemoryDispatcher()
    set_dispatcher(dispatcher)

    member = Role("member")
    for title in (SUBMIT, SUBSCRIBE):
        member.add_permission((await Permission.get_or_create(title)).id)  # type: ignore[arg-type]
    await member.save()
    alice = await Principal("user", username="alice", email="alice@example.com").save()
    await alice.add_role(member.id).save()  # type: ignore[arg-type]
    mallory = await Principal("user", username="mallory").save()
    channel = await Channel("General").save()
    await channel.subscribe(alice.id)
    assert (alice.id, mallory.id, channel.id) == (1, 2, 1)

    alice_token, mallory_token, revoked = [await tokens.issue(p) for p in (1, 2, 1)]
    await tokens.revoke(revoked.id)
    done = await HttpIngress().submit(1, 1, {"content": "first", "idempotency_key": "k-1"})
    assert done.created and done.message_id == 1
    message = await Message.get(1)
    assert message is not None and len(dispatcher.jobs) == 1

    yield World(
        alice,
        mallory,
        channel,
        message,
        dispatcher,
        database_url,
        {
            "alice": alice_token.token,
            "mallory": mallory_token.token,
            "revoked": revoked.token,
            "unknown": "chn_" + "A" * 43,
        },
    )
    set_dispatcher(None)


@pytest.fixture
def w(world: World) -> World:
    """The world, with its database and dispatcher in force again (another module may
    have run in between, since the backend parameter regroups tests)."""
    configure(database_url=world.database_url, egress_allow_cidrs="127.0.0.0/8")
    set_dispatcher(world.dispatcher)
    return world


State = dict[str, list[tuple[Any, ...]]]


async def _state(*, used_token: str | None = None) -> State:
    """Every row of every table, ``used_token``'s ``last_used_at`` left out."""
    # Imported here: ``tests/`` is on sys.path under pytest, not under ``python -m``.
    from _support import snapshot

    rows: State = await snapshot()
    if used_token is not None:
        digest = hashlib.sha256(used_token.encode()).hexdigest()  # as tokens.py stores it
        table = TokenRow.__tablename__
        async with db.session() as s:
            result = await s.execute(text(f"SELECT * FROM {table}"))
            keys = list(result.keys())
            by_hash, last_used = keys.index("token_hash"), keys.index("last_used_at")
            rows[table] = sorted(
                (
                    tuple(
                        None if i == last_used and row[by_hash] == digest else value
                        for i, value in enumerate(row)
                    )
                    for row in result
                ),
                key=repr,
            )
    return rows


@dataclass(frozen=True)
class _Recorded:
    """What the dispatcher was handed so far: routing jobs and delivery batches."""

    jobs: tuple[RouteJob, ...]
    batches: tuple[tuple[Batch, float], ...]


def _recorded(w: World) -> _Recorded:
    return _Recorded(tuple(w.dispatcher.jobs), tuple(w.dispatcher.batches))


# -- HTTP ------------------------------------------------------------------------------------


_UNSET: Any = object()


@dataclass(frozen=True)
class HttpCase:
    id: str
    input: str
    status: int
    detail: str  # the problem's detail, exactly
    path: str = "/channels/1/messages"
    method: str = "POST"
    token: str | None = "alice"  # a World.tokens key; None: no Authorization header
    json: Any = _UNSET
    content: bytes | None = None
    stream: int | None = None  # send this many 64 KiB chunks without Content-Length
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return f"{self.status} {TITLES[self.status]}: {self.detail}"


HTTP_CASES: list[HttpCase] = [
    HttpCase(
        "no-token",
        "no Authorization header",
        401,
        "send Authorization: Bearer <token>",
        token=None,
        json={"content": "x"},
    ),
    HttpCase(
        "basic-auth",
        "Authorization: Basic instead of Bearer",
        401,
        "the Authorization header must be 'Bearer <token>'",
        token=None,
        json={"content": "x"},
        headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    ),
    HttpCase(
        "unknown-token",
        "a well-formed bearer token nobody was issued",
        401,
        "the bearer token is unknown or revoked",
        token="unknown",
        json={"content": "x"},
    ),
    HttpCase(
        "revoked-token",
        "alice's revoked token",
        401,
        "the bearer token is unknown or revoked",
        token="revoked",
        json={"content": "x"},
    ),
    HttpCase(
        "malformed-json",
        'body `{"content": "x"` (unterminated)',
        422,
        "invalid request body: (body): the body is not valid JSON",
        content=b'{"content": "x"',
    ),
    HttpCase(
        "json-array",
        'body `["content", "x"]`, not an object',
        422,
        "invalid request body: (body): must be a JSON object",
        json=["content", "x"],
    ),
    HttpCase(
        "content-number",
        'wrong type: `{"content": 5}`',
        422,
        "invalid request body: content: Input should be a valid string",
        json={"content": 5},
    ),
    HttpCase(
        "id-as-string",
        'wrong type: `"reply_to_id": "1"`',
        422,
        "invalid request body: reply_to_id: Input should be a valid integer",
        json={"content": "x", "reply_to_id": "1"},
    ),
    HttpCase(
        "negative-reference",
        'negative id: `"references": [-1]`',
        422,
        "invalid request body: references[0]: Input should be greater than or equal to 1",
        json={"content": "x", "references": [-1]},
    ),
    HttpCase(
        "id-beyond-bigint",
        "`reply_to_id: 10**30`, beyond BIGINT",
        422,
        "invalid request body: reply_to_id: Input should be less than or equal to "
        "9223372036854775807",
        json={"content": "x", "reply_to_id": 10**30},
    ),
    HttpCase(
        "too-many-references",
        "oversize list: 101 `references` (at most 100)",
        422,
        "invalid request body: references: List should have at most 100 items after "
        "validation, not 101",
        json={"content": "x", "references": list(range(1, 102))},
    ),
    HttpCase(
        "not-utf8",
        'body `{"content": "\\xff"}`, not UTF-8',
        422,
        "invalid request body: (body): the body is not UTF-8",
        content=b'{"content": "\xff"}',
    ),
    HttpCase(
        "lone-surrogate",
        '`"content": "\\ud800"` (a lone surrogate)',
        422,
        "invalid request body: content: Input should be a valid string, unable to parse "
        "raw data as a unicode string",
        content=b'{"content": "\\ud800"}',
    ),
    HttpCase(
        "deep-nesting",
        "JSON nested 100,000 arrays deep",
        422,
        "invalid request body: (body): the body is not valid JSON",
        content=b'{"content": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ),
    HttpCase(
        "latin1-charset",
        "Content-Type: application/json; charset=latin-1",
        415,
        "the request body must be JSON: send Content-Type: application/json "
        "(got application/json; charset=latin-1)",
        content=b'{"content": "x"}',
        headers={"Content-Type": "application/json; charset=latin-1"},
    ),
    HttpCase(
        "long-token",
        "a 304-character bearer token",
        401,
        "a valid bearer token is required",
        token=None,
        json={"content": "x"},
        headers={"Authorization": "Bearer chn_" + "a" * 300},
    ),
    HttpCase(
        "path-id-not-integer",
        "channel id `seven` in the path",
        422,
        "invalid request: path.channel_id: Input should be a valid integer, "
        "unable to parse string as an integer",
        path="/channels/seven/messages",
        json={"content": "x"},
    ),
    HttpCase(
        "path-id-negative",
        "channel id `-1` in the path",
        422,
        "invalid request: path.channel_id: Input should be greater than or equal to 1",
        path="/channels/-1/messages",
        json={"content": "x"},
    ),
    HttpCase(
        "content-over-limit",
        f"content of {LIMIT + 1} bytes (max content bytes + 1)",
        413,
        f"content is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes",
        json={"content": TOO_LARGE},
    ),
    HttpCase(
        "body-over-limit",
        f"a 4 MiB JSON body with Content-Length (body limit {BODY_LIMIT})",
        413,
        f"the request body is over the limit of {BODY_LIMIT} bytes",
        content=jsonlib.dumps({"content": HUGE}).encode(),
    ),
    HttpCase(
        "chunked-body-over-limit",
        "a 4 MiB body streamed without Content-Length",
        413,
        f"the request body is over the limit of {BODY_LIMIT} bytes",
        stream=64,
    ),
    HttpCase(
        "request-text-plain",
        "request Content-Type: text/plain",
        415,
        "the request body must be JSON: send Content-Type: application/json (got text/plain)",
        content=b'{"content": "x"}',
        headers={"Content-Type": "text/plain"},
    ),
    HttpCase(
        "unsupported-content-type",
        '`"content_type": "video/mp4"`',
        415,
        f"content_type 'video/mp4' is not supported; use one of {ALLOWED}",
        json={"content": "x", "content_type": "video/mp4"},
    ),
    HttpCase(
        "crlf-content-type",
        'header injection: `"content_type": "text/plain\\r\\nBcc: ..."`',
        422,
        "invalid request body: content_type: String should match pattern "
        "'^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$'",
        json={"content": "x", "content_type": CRLF_TYPE},
    ),
    HttpCase(
        "crlf-idempotency-key",
        'header injection: `"idempotency_key": "k\\r\\nX-Injected: 1"`',
        422,
        "invalid request body: idempotency_key: String should match pattern '^[!-~]+$'",
        json={"content": "x", "idempotency_key": "k\r\nX-Injected: 1"},
    ),
    HttpCase(
        "nul-in-content",
        'NUL byte: `"content": "a\\u0000b"`',
        422,
        "invalid request body: content: String should match pattern '^[^\\x00]+$'",
        json={"content": "a\x00b"},
    ),
    HttpCase(
        "unknown-field",
        'unknown field `"priority": "high"`',
        422,
        "invalid request body: priority: Extra inputs are not permitted",
        json={"content": "x", "priority": "high"},
    ),
    HttpCase(
        "forged-author",
        "alice's token, body `author_id: 2` (mallory)",
        403,
        "author_id 2 is not allowed: the author is the token's principal (1)",
        json={"content": "x", "author_id": 2},
    ),
    HttpCase(
        "no-submit-permission",
        "mallory's token (no channel.submit)",
        403,
        "principal 2 lacks permission 'channel.submit' on channel 1",
        token="mallory",
        json={"content": "x"},
    ),
    HttpCase(
        "unknown-channel",
        f"channel {MISSING} in the path, which does not exist",
        404,
        f"channel {MISSING} not found",
        path=f"/channels/{MISSING}/messages",
        json={"content": "x"},
    ),
    HttpCase(
        "unknown-reply-to",
        f"`reply_to_id: {MISSING}`",
        404,
        f"message {MISSING} not found",
        json={"content": "x", "reply_to_id": MISSING},
    ),
    HttpCase(
        "replayed-key-other-body",
        'idempotency key "k-1" again with another content',
        409,
        "idempotency key 'k-1' was used for a different request (message 1); "
        "use a new key for a new message",
        json={"content": "not the first", "idempotency_key": "k-1"},
    ),
    HttpCase(
        "unknown-message",
        f"message {MISSING} in the path, which does not exist",
        404,
        f"message {MISSING} not found",
        method="GET",
        path=f"/messages/{MISSING}",
    ),
    HttpCase(
        "subscribe-id-as-string",
        'wrong type: `{"subscriber_id": "2"}`',
        422,
        "invalid request body: subscriber_id: Input should be a valid integer",
        path="/channels/1/subscriptions",
        json={"subscriber_id": "2"},
    ),
]


async def _chunks(count: int) -> AsyncIterator[bytes]:
    yield b'{"content": "'
    for _ in range(count):
        yield b"x" * 65536
    yield b'"}'


def _request(case: HttpCase, w: World) -> dict[str, Any]:
    headers: dict[str, str] = {}
    if case.token is not None:
        headers["Authorization"] = f"Bearer {w.tokens[case.token]}"
    kwargs: dict[str, Any] = {}
    if case.json is not _UNSET:
        kwargs["json"] = case.json
    elif case.content is not None or case.stream is not None:
        headers["Content-Type"] = "application/json"
        kwargs["content"] = case.content if case.stream is None else _chunks(case.stream)
    headers.update(case.headers)
    kwargs["headers"] = headers
    return kwargs


@pytest.fixture(scope="module")
async def api(world: World) -> AsyncIterator[httpx.AsyncClient]:
    """The real FastAPI app in process (no lifespan: the test owns the pools)."""
    from producer.ingress import create_app

    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
        yield client


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
async def test_http(case: HttpCase, w: World, api: httpx.AsyncClient) -> None:
    # A valid token presented is a token used, whatever the answer: its last_used_at may move.
    used = w.tokens[case.token] if case.token is not None and case.status != 401 else None
    before, recorded = await _state(used_token=used), _recorded(w)

    response = await api.request(case.method, case.path, **_request(case, w))

    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == case.status
    assert body["type"].startswith("urn:channels:problem:")
    assert (body["title"], body["detail"]) == (TITLES[case.status], case.detail)
    if case.status == 401:
        assert response.headers["www-authenticate"].startswith('Bearer realm="channels"')
    if case.status == 422:
        assert body["errors"] and all(set(e) == {"field", "message"} for e in body["errors"])
    assert await _state(used_token=used) == before
    assert _recorded(w) == recorded


async def test_http_an_accepted_submission_is_seen(w: World, api: httpx.AsyncClient) -> None:
    """The control: what the refusals are compared with would show an accepted request."""
    before, recorded = await _state(used_token=w.tokens["alice"]), _recorded(w)
    response = await api.post(
        "/channels/1/messages",
        headers={"Authorization": f"Bearer {w.tokens['alice']}"},
        json={"content": "accepted", "idempotency_key": "control"},
    )
    assert response.status_code == 201, response.text
    after = await _state(used_token=w.tokens["alice"])
    assert {t for t in after if after[t] != before[t]} == {"messages", "outbox", "idempotency_keys"}
    assert len(_recorded(w).jobs) == len(recorded.jobs) + 1


# -- CLI -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliCase:
    id: str
    input: str
    args: tuple[str, ...]
    exit_code: int  # 1: refused by the domain; 2: a usage error Click finds first
    error: str  # the one Error: line, after "Error: "

    @property
    def answer(self) -> str:
        return f"exit {self.exit_code}: Error: {self.error}"


def _send(*args: str) -> tuple[str, ...]:
    return ("channel", "send", *args)


CLI_CASES: list[CliCase] = [
    CliCase(
        "send-unknown-channel",
        f"channel send {MISSING} hi --author-id 1",
        _send(str(MISSING), "hi", "--author-id", "1"),
        1,
        f"channel {MISSING} not found",
    ),
    CliCase(
        "send-unknown-author",
        f"channel send 1 hi --author-id {MISSING}",
        _send("1", "hi", "--author-id", str(MISSING)),
        1,
        f"principal {MISSING} not found",
    ),
    CliCase(
        "send-as-author-without-submit",
        "channel send 1 hi --author-id 2 (mallory)",
        _send("1", "hi", "--author-id", "2"),
        1,
        "principal 2 lacks permission 'channel.submit' on channel 1",
    ),
    CliCase(
        "send-empty-content",
        'channel send 1 "" --author-id 1',
        _send("1", "", "--author-id", "1"),
        1,
        "content must not be empty",
    ),
    CliCase(
        "send-content-over-limit",
        f"channel send with {LIMIT + 1} bytes of content",
        _send("1", TOO_LARGE, "--author-id", "1"),
        1,
        f"content is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes",
    ),
    CliCase(
        "send-huge-content",
        "channel send with 4 MiB of content",
        _send("1", HUGE, "--author-id", "1"),
        1,
        f"content is {len(HUGE)} bytes, over the limit of {LIMIT} bytes",
    ),
    CliCase(
        "send-nul-in-content",
        "channel send 1 'a\\0b' --author-id 1",
        _send("1", "a\x00b", "--author-id", "1"),
        1,
        "content must not contain NUL characters",
    ),
    CliCase(
        "send-crlf-content-type",
        "channel send ... --content-type 'text/plain\\r\\nBcc: ...'",
        _send("1", "hi", "--author-id", "1", "--content-type", CRLF_TYPE),
        1,
        f"content_type {CRLF_TYPE!r} is not a MIME type like 'text/plain'",
    ),
    CliCase(
        "send-unsupported-content-type",
        "channel send ... --content-type video/mp4",
        _send("1", "hi", "--author-id", "1", "--content-type", "video/mp4"),
        1,
        f"content_type 'video/mp4' is not supported; use one of {ALLOWED}",
    ),
    CliCase(
        "send-unknown-reply-to",
        f"channel send ... --reply-to {MISSING}",
        _send("1", "hi", "--author-id", "1", "--reply-to", str(MISSING)),
        1,
        f"message {MISSING} not found",
    ),
    CliCase(
        "send-unknown-conversation",
        f"channel send ... --conversation {MISSING}",
        _send("1", "hi", "--author-id", "1", "--conversation", str(MISSING)),
        1,
        f"conversation {MISSING} not found",
    ),
    CliCase(
        "send-channel-not-integer",
        "channel send general hi --author-id 1",
        _send("general", "hi", "--author-id", "1"),
        2,
        "Invalid value for 'CHANNEL': 'general' is not an id (a positive integer)",
    ),
    CliCase(
        "send-negative-author",
        "channel send 1 hi --author-id -1",
        _send("1", "hi", "--author-id", "-1"),
        2,
        "Invalid value for '--author-id': '-1' is not an id (a positive integer)",
    ),
    CliCase(
        "email-crlf",
        "principal create --email 'eve@example.com\\r\\nBcc: ...'",
        ("principal", "create", "--username", "eve", "--email", CRLF_EMAIL),
        1,
        f"email {CRLF_EMAIL!r} is not an email address",
    ),
    CliCase(
        "email-alias-crlf",
        "principal create --alias 'email=eve@example.com\\r\\nBcc: ...'",
        ("principal", "create", "--username", "eve", "--alias", f"email={CRLF_EMAIL}"),
        1,
        "alias 'email' must not contain CR, LF or NUL characters",
    ),
    CliCase(
        "token-unknown-principal",
        f"principal token {MISSING}",
        ("principal", "token", str(MISSING)),
        1,
        f"principal {MISSING} not found",
    ),
    CliCase(
        "revoke-unknown-token",
        f"principal revoke-token {MISSING}",
        ("principal", "revoke-token", str(MISSING)),
        1,
        f"token {MISSING} not found",
    ),
    CliCase(
        "retry-unknown-delivery",
        f"retry {MISSING}",
        ("retry", str(MISSING)),
        1,
        f"delivery {MISSING} not found",
    ),
]


def _invoke(args: tuple[str, ...]) -> tuple[int, str, str]:
    from channels_cli.main import cli

    result = CliRunner().invoke(cli, list(args), prog_name="channels")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash is a bug: show its traceback
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
async def test_cli(case: CliCase, w: World) -> None:
    before, recorded = await _state(), _recorded(w)

    # The CLI runs asyncio.run per command: give it a thread without a running loop.
    exit_code, stdout, stderr = await asyncio.to_thread(_invoke, case.args)

    assert exit_code == case.exit_code, (exit_code, stdout, stderr)
    assert stdout == "" and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert errors == [f"Error: {case.error}"]
    if case.exit_code == 1:  # a refusal is that line alone; a usage error comes with usage
        assert stderr.splitlines() == errors
    assert await _state() == before
    assert _recorded(w) == recorded


# -- Python API ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonCase:
    id: str
    input: str
    call: Callable[[World], Awaitable[object]]
    error: type[Exception] | None  # None: not raised, a refused Dispatch (the spec's rule)
    message: str  # the error's message (or the refused result's one error), exactly

    @property
    def answer(self) -> str:
        if self.error is None:
            return f"no exception: a refused Dispatch, its result's error: {self.message}"
        return f"{self.error.__name__}: {self.message}"


async def _now(fn: Callable[[], object]) -> object:
    """A synchronous call (a setter) as a case's awaitable."""
    return fn()


def _ghost() -> Channel:
    ghost = Channel("ghost")
    ghost.id = MISSING
    return ghost


def _producer() -> Any:
    from producer import AsyncProducer

    return AsyncProducer()


PYTHON_CASES: list[PythonCase] = [
    PythonCase(
        "send-unknown-channel",
        f"Message.send to channel {MISSING}, which does not exist",
        lambda w: Message("hi", author_id=1).send([w.channel, _ghost()]),
        NotFoundError,
        f"channel {MISSING} not found",
    ),
    PythonCase(
        "send-unknown-author",
        f"Message(author_id={MISSING}).send",
        lambda w: Message("hi", author_id=MISSING).send(w.channel),
        NotFoundError,
        f"principal {MISSING} not found",
    ),
    PythonCase(
        "send-as-author-without-submit",
        "Message(author_id=2).send (mallory lacks channel.submit)",
        lambda w: Message("hi", author_id=2).send(w.channel),
        None,
        "principal 2 lacks permission 'channel.submit' on channel 1",
    ),
    PythonCase(
        "ingress-forged-author",
        "HttpIngress.submit as principal 1 with author_id 2",
        lambda w: HttpIngress().submit(1, 1, {"content": "x", "author_id": 2}),
        IngressRefusedError,
        "author_id 2 is not allowed: the author is the token's principal (1)",
    ),
    PythonCase(
        "ingress-replayed-key-other-body",
        'HttpIngress.submit with key "k-1" and another content',
        lambda w: HttpIngress().submit(1, 1, {"content": "other", "idempotency_key": "k-1"}),
        ConflictError,
        "idempotency key 'k-1' was used for a different request (message 1); "
        "use a new key for a new message",
    ),
    PythonCase(
        "content-over-limit",
        f"Message.send with {LIMIT + 1} bytes of content",
        lambda w: Message(TOO_LARGE, author_id=1).send(w.channel),
        ContentTooLargeError,
        f"content is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes",
    ),
    PythonCase(
        "huge-content",
        "AsyncProducer.send with 4 MiB of content",
        lambda w: _producer().send(1, HUGE, author_id=1),
        ContentTooLargeError,
        f"content is {len(HUGE)} bytes, over the limit of {LIMIT} bytes",
    ),
    PythonCase(
        "content-not-a-string",
        "Message(b'bytes').send",
        lambda w: Message(b"bytes", author_id=1).send(w.channel),  # type: ignore[arg-type]
        ValidationError,
        "content must be a string, not bytes",
    ),
    PythonCase(
        "nul-in-content",
        "Message('a\\0b').send",
        lambda w: Message("a\x00b", author_id=1).send(w.channel),
        ValidationError,
        "content must not contain NUL characters",
    ),
    PythonCase(
        "lone-surrogate",
        "Message('\\ud800').send (not encodable as UTF-8)",
        lambda w: Message("\ud800", author_id=1).send(w.channel),
        ValidationError,
        "content is not valid Unicode (it holds a lone surrogate)",
    ),
    PythonCase(
        "crlf-content-type",
        "Message(content_type='text/plain\\r\\nBcc: ...').send",
        lambda w: Message("hi", author_id=1, content_type=CRLF_TYPE).send(w.channel),
        ValidationError,
        f"content_type {CRLF_TYPE!r} is not a MIME type like 'text/plain'",
    ),
    PythonCase(
        "crlf-email",
        "Principal(email='eve@example.com\\r\\nBcc: ...').save()",
        lambda w: Principal("user", email=CRLF_EMAIL).save(),
        ValidationError,
        f"email {CRLF_EMAIL!r} is not an email address",
    ),
    PythonCase(
        "crlf-email-alias",
        "alice.set_alias('email', 'eve@example.com\\r\\nBcc: ...')",
        lambda w: _now(lambda: w.alice.set_alias("email", CRLF_EMAIL)),
        ValidationError,
        "alias 'email' must not contain CR, LF or NUL characters",
    ),
    PythonCase(
        "crlf-email-subject",
        "channel.set_alias('email_subject', 'Hi\\r\\nBcc: ...')",
        lambda w: _now(lambda: w.channel.set_alias("email_subject", "Hi\r\nBcc: x@example.com")),
        ValidationError,
        "alias 'email_subject' must not contain CR, LF or NUL characters",
    ),
    PythonCase(
        "id-as-string",
        "Message.set_reply_to_id('1')",
        lambda w: _now(lambda: Message("hi").set_reply_to_id("1")),  # type: ignore[arg-type]
        ValidationError,
        "reply_to_id must be a positive integer id, not '1'",
    ),
    PythonCase(
        "negative-id",
        "Message.set_author_id(-1)",
        lambda w: _now(lambda: Message("hi").set_author_id(-1)),
        ValidationError,
        "author_id must be a positive integer id, not -1",
    ),
    PythonCase(
        "registry-id-not-integer",
        "ChannelRegistry().get('1')",
        lambda w: ChannelRegistry().get("1"),  # type: ignore[arg-type]
        ValidationError,
        "channel_id must be a positive integer id, not '1'",
    ),
    PythonCase(
        "unknown-reply-to",
        f"Message.set_reply_to_id({MISSING}).send",
        lambda w: Message("hi", author_id=1).set_reply_to_id(MISSING).send(w.channel),
        NotFoundError,
        f"message {MISSING} not found",
    ),
    PythonCase(
        "unknown-thread",
        f"MessageRegistry().get_thread({MISSING})",
        lambda w: MessageRegistry().get_thread(MISSING),
        NotFoundError,
        f"message {MISSING} not found",
    ),
    PythonCase(
        "unknown-subscriber",
        f"channel.subscribe({MISSING})",
        lambda w: w.channel.subscribe(MISSING),
        NotFoundError,
        f"principal {MISSING} not found",
    ),
    PythonCase(
        "garbage-token",
        "tokens.authenticate('not-a-token')",
        lambda w: tokens.authenticate("not-a-token"),
        AuthenticationError,
        "a valid bearer token is required",
    ),
    PythonCase(
        "revoked-token",
        "tokens.authenticate(alice's revoked token)",
        lambda w: tokens.authenticate(w.tokens["revoked"]),
        AuthenticationError,
        "the bearer token is unknown or revoked",
    ),
    PythonCase(
        "subscribe-without-permission",
        "channel.subscribe(2, by=2) (mallory lacks channel.subscribe)",
        lambda w: w.channel.subscribe(2, by=2),
        PermissionDeniedError,
        "principal 2 lacks permission 'channel.subscribe' on channel 1",
    ),
    PythonCase(
        "send-many-unknown-field",
        "AsyncProducer.send_many([{..., 'subject': 'hi'}], 1)",
        lambda w: _producer().send_many([{"content": "x", "author_id": 1, "subject": "hi"}], 1),
        ValidationError,
        "unknown message fields: subject",
    ),
    PythonCase(
        "send-many-bad-message-in-later-chunk",
        f"AsyncProducer.send_many([ok, author {MISSING}], 1, chunk=1)",
        lambda w: _producer().send_many(
            [{"content": "ok", "author_id": 1}, {"content": "x", "author_id": MISSING}],
            1,
            chunk=1,
        ),
        NotFoundError,
        f"principal {MISSING} not found",
    ),
    PythonCase(
        "send-many-zero-chunk",
        "AsyncProducer.send_many([ok], 1, chunk=0)",
        lambda w: _producer().send_many([{"content": "ok", "author_id": 1}], 1, chunk=0),
        ValidationError,
        "chunk must be a positive integer, not 0",
    ),
    PythonCase(
        "send-many-negative-chunk",
        "AsyncProducer.send_many([ok], 1, chunk=-1)",
        lambda w: _producer().send_many([{"content": "ok", "author_id": 1}], 1, chunk=-1),
        ValidationError,
        "chunk must be a positive integer, not -1",
    ),
]


@pytest.mark.parametrize("case", PYTHON_CASES, ids=[c.id for c in PYTHON_CASES])
async def test_python(case: PythonCase, w: World) -> None:
    before, recorded = await _state(), _recorded(w)

    if case.error is None:
        dispatch = await case.call(w)
        assert isinstance(dispatch, Dispatch)
        [result] = dispatch.results
        assert dispatch.accepted is False and result.success is False
        assert result.errors == [case.message]
    else:
        with pytest.raises(case.error) as raised:
            await case.call(w)
        assert type(raised.value) is case.error  # the exact class, not a parent
        assert str(raised.value) == case.message

    assert await _state() == before
    assert _recorded(w) == recorded


async def test_python_send_many_over_several_chunks_still_sends(w: World) -> None:
    """The control for the send_many cases: good messages over three chunks all go."""
    before, recorded = await _state(), _recorded(w)
    dispatches = await _producer().send_many(
        [
            {"content": "one", "author_id": 1},
            {"content": "two", "author_id": 1, "reply_to_id": 1, "references": [1]},
            {"content": "three", "author_id": 1},
        ],
        1,
        chunk=1,
    )
    assert [d.accepted for d in dispatches] == [True, True, True]
    after = await _state()
    assert len(after["messages"]) == len(before["messages"]) + 3
    assert len(after["outbox"]) == len(before["outbox"]) + 3
    assert len(_recorded(w).jobs) == len(recorded.jobs) + 3


# -- the catalog -----------------------------------------------------------------------------

Surface = Literal["HTTP", "CLI", "Python"]

CASES: list[tuple[Surface, str, str, str]] = [
    *(("HTTP", c.id, f"{c.method} {c.path}: {c.input}", c.answer) for c in HTTP_CASES),
    *(("CLI", c.id, c.input, c.answer) for c in CLI_CASES),
    *(("Python", c.id, c.input, c.answer) for c in PYTHON_CASES),
]
"""(surface, id, input, expected answer): one row per case, for the issue note."""


def markdown() -> str:
    """``CASES`` as a markdown table."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| surface | id | input | answer |", "|---|---|---|---|"]
    lines += [f"| {s} | `{i}` | {cell(inp)} | {cell(ans)} |" for s, i, inp, ans in CASES]
    return "\n".join(lines)


def test_the_catalog_is_complete() -> None:
    per_surface = {s: sum(1 for c in CASES if c[0] == s) for s in ("HTTP", "CLI", "Python")}
    assert per_surface["HTTP"] >= 12 and per_surface["CLI"] >= 10 and per_surface["Python"] >= 10
    assert len({(s, i) for s, i, _, _ in CASES}) == len(CASES), "case ids must be unique"
    assert markdown().count("\n") == len(CASES) + 1


if __name__ == "__main__":
    print(markdown())
