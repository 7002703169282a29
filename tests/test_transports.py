"""Transports against real local servers, in-process; no database.

Signing is checked with the ``standardwebhooks`` package, HTTP against
``WebhookReceiver`` and small servers written here (a 50 MB body, a
byte-dripping answer), email against ``SmtpReceiver`` (aiosmtpd), the queue
transport against the embedded Valkey. Nothing here dials a non-loopback
address: where a public IP literal is used, connecting is patched to record
and raise.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from channels_cli.devservers import QueueConsumer, SmtpReceiver, WebhookReceiver, free_port
from channels_core.errors import ValidationError
from channels_core.primitives import Channel, Message, Principal
from channels_core.retry import MAX_RETRY_AFTER, next_delay
from channels_core.settings import Settings, configure, get_settings
from channels_core.signing import new_secret, secret_bytes, sign, signature_headers
from channels_core.ssrf import EgressBlocked, blocked_reason
from channels_core.transports.base import TransportResult
from channels_core.transports.email import EmailEgress
from channels_core.transports.http import (
    HttpEgress,
    _guarded_socket,
    _GuardedResolver,
    classify_status,
    parse_retry_after,
)
from channels_core.transports.queue import QueueEgress

MB = 1024 * 1024


# -- fixtures and builders ---------------------------------------------------------


@pytest.fixture
def tune() -> Iterator[Callable[..., Settings]]:
    """Layer setting values over the ones in force; restored after the test."""
    previous = get_settings()

    def apply(**values: Any) -> Settings:
        return configure(get_settings().model_copy(update=values))

    apply(egress_allow_cidrs="127.0.0.0/8")
    yield apply
    configure(previous)


@pytest.fixture
async def http(tune: Callable[..., Settings]) -> Any:
    egress = HttpEgress()
    yield egress
    await egress.aclose()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpReceiver]:
    server = SmtpReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def mail_settings(tune: Callable[..., Settings], smtp: SmtpReceiver) -> Settings:
    return tune(
        smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_from="alerts@example.test", smtp_timeout=10
    )


def principal(pid: int, delivery_id: int | None = None, **aliases: str) -> Principal:
    p = Principal("bot")
    p.aliases = dict(aliases)  # set directly: some tests need values the setters refuse
    p.id, p.delivery_id = pid, delivery_id
    return p


def message(content: str = "hi", mid: int = 1) -> Message:
    m = Message(content, author_id=1)
    m.id = mid
    return m


def channel(title: str = "T", cid: int = 1) -> Channel:
    c = Channel(title)
    c.id = cid
    return c


def unique(prefix: str) -> str:
    return f"/{prefix}/{uuid.uuid4().hex[:8]}"


async def poll(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class AioServer:
    """A one-handler aiohttp server on its own thread and loop."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.port = free_port()
        self._handler = handler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def __enter__(self) -> AioServer:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Dripper:
    """A raw TCP server answering one byte per second: a slowloris response."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    for i in range(len(answer)):
                        conn.sendall(answer[i : i + 1])
                        self.bytes_sent += 1
                        if self._stop.wait(1.0):
                            break
                except OSError:
                    pass

    def __enter__(self) -> Dripper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()


# -- signing ---------------------------------------------------------------------------


def test_signature_is_standard_webhooks_and_verifies_with_the_reference_package() -> None:
    secret = new_secret()
    body = json.dumps({"type": "message.created", "data": {"content": "hi"}}).encode()
    now = int(time.time())

    headers = signature_headers([secret], "dlv_42", now, body)

    assert secret.startswith("whsec_") and len(secret_bytes(secret)) >= 24
    assert headers["webhook-id"] == "dlv_42" and headers["webhook-timestamp"] == str(now)
    expected = hmac.new(secret_bytes(secret), f"dlv_42.{now}.".encode() + body, hashlib.sha256)
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected.digest()).decode()
    assert headers["webhook-signature"] == sign(secret, "dlv_42", now, body)
    assert Webhook(secret).verify(body, headers) == {
        "type": "message.created",
        "data": {"content": "hi"},
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"hi", b"ho"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_two_secrets_during_rotation_both_verify() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"n":1}'
    headers = signature_headers([old, new], "dlv_7", int(time.time()), body)

    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    assert Webhook(old).verify(body, headers) == {"n": 1}
    assert Webhook(new).verify(body, headers) == {"n": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_a_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValidationError, match="whsec_"):
        sign("whsec_not base64!", "dlv_1", 0, b"{}")


# -- the retry schedule ----------------------------------------------------------------


def test_next_delay_follows_the_schedule_with_bounded_jitter() -> None:
    schedule = (0, 10, 100)
    rng = random.Random(7)

    assert next_delay(0, schedule=schedule, jitter=0.1, rng=rng) == 0  # zero is never jittered
    draws = [next_delay(2, schedule=schedule, jitter=0.1, rng=rng) for _ in range(200)]
    assert all(d is not None and 90 <= d <= 110 for d in draws)
    assert (
        min(d for d in draws if d is not None) < 95 < 105 < max(d for d in draws if d is not None)
    )
    assert next_delay(1, schedule=schedule, jitter=0.0) == 10
    assert next_delay(3, schedule=schedule, jitter=0.1) is None  # exhausted
    assert next_delay(30, schedule=schedule) is None


def test_next_delay_honours_retry_after_within_bounds() -> None:
    schedule = (0, 10, 100)

    assert next_delay(1, 60, schedule=schedule, jitter=0.1) == 60  # longer: the receiver's
    shorter = next_delay(2, 1, schedule=schedule, jitter=0.1)
    assert shorter is not None and shorter >= 90  # shorter: the schedule's
    assert next_delay(1, 10**9, schedule=schedule) == MAX_RETRY_AFTER  # a hostile receiver
    assert next_delay(3, 60, schedule=schedule) is None  # exhausted even so


def test_next_delay_reads_the_configured_schedule(tune: Callable[..., Settings]) -> None:
    tune(retry_schedule="0,5,300", retry_jitter=0.0)

    assert [next_delay(n) for n in range(4)] == [0, 5, 300, None]


# -- HTTP: classification ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "delivered"),
        (201, "delivered"),
        (204, "delivered"),
        (299, "delivered"),
        (408, "transient"),
        (429, "transient"),
        (500, "transient"),
        (502, "transient"),
        (503, "transient"),
        (599, "transient"),
        (301, "permanent"),
        (302, "permanent"),
        (400, "permanent"),
        (401, "permanent"),
        (403, "permanent"),
        (404, "permanent"),
        (410, "permanent"),
        (413, "permanent"),
    ],
)
def test_classify_status(status: int, outcome: str) -> None:
    assert classify_status(status) == outcome


def test_parse_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert parse_retry_after(in_a_minute) == pytest.approx(60, abs=2)
    an_hour_ago = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(an_hour_ago) == 0.0


# -- HTTP against real servers ---------------------------------------------------------


async def test_http_delivers_a_signed_post(http: HttpEgress, receiver: WebhookReceiver) -> None:
    path = unique("ok")
    secret = new_secret()
    subscriber = principal(5, delivery_id=42, endpoint=receiver.url(path), webhook_secret=secret)

    [result] = await http.send(message("hello", mid=9), channel("News", cid=3), [subscriber])

    assert (result.success, result.status_code, result.subscriber_id) == (True, 200, 5)
    assert result.latency_ms is not None and result.latency_ms > 0
    [got] = receiver.for_path(path)
    assert got.webhook_id == "dlv_42"
    assert got.headers["content-type"] == "application/json"
    payload = receiver.verify(got, secret)
    assert payload["type"] == "message.created"
    assert payload["data"] == {
        **payload["data"],
        "message_id": 9,
        "channel_id": 3,
        "channel": "News",
        "content": "hello",
    }


async def test_http_signs_with_every_secret_during_rotation(
    http: HttpEgress, receiver: WebhookReceiver
) -> None:
    path = unique("rotating")
    old, new = new_secret(), new_secret()
    subscriber = principal(
        5, delivery_id=43, endpoint=receiver.url(path), webhook_secret=f"{old} {new}"
    )

    [result] = await http.send(message(), channel(), [subscriber])

    assert result.success
    [got] = receiver.for_path(path)
    assert len(got.headers["webhook-signature"].split()) == 2
    assert receiver.verify(got, old)["data"]["message_id"] == 1
    assert receiver.verify(got, new)["data"]["message_id"] == 1


async def test_http_classifies_answers_per_subscriber(
    http: HttpEgress, receiver: WebhookReceiver
) -> None:
    answers: dict[str, Any] = {
        unique("s500"): 500,
        unique("s404"): 404,
        unique("s400"): 400,
        unique("s410"): 410,
        unique("s429"): (429, {"Retry-After": "3"}),
        unique("s200"): 200,
    }
    for path, answer in answers.items():
        receiver.script(path, [answer])
    subscribers = [
        principal(i, delivery_id=100 + i, endpoint=receiver.url(p))
        for i, p in enumerate(answers, 1)
    ]

    results = await http.send(message(), channel(), subscribers)

    seen = [
        (r.subscriber_id, r.success, r.permanent, r.status_code, r.retry_after) for r in results
    ]
    assert seen == [
        (1, False, False, 500, None),
        (2, False, True, 404, None),
        (3, False, True, 400, None),
        (4, False, True, 410, None),
        (5, False, False, 429, 3.0),
        (6, True, False, 200, None),
    ]
    assert results[0].errors == ["HTTP 500"]
    for path in answers:
        assert len(receiver.for_path(path)) == 1


async def test_http_redirects_are_not_followed(http: HttpEgress, receiver: WebhookReceiver) -> None:
    path = unique("moved")
    with_second = WebhookReceiver().start()
    try:
        receiver.script(path, [(302, {"Location": with_second.url("/elsewhere")})])

        [result] = await http.send(
            message(), channel(), [principal(1, endpoint=receiver.url(path))]
        )

        assert (result.success, result.permanent, result.status_code) == (False, True, 302)
        assert "redirect" in result.errors[0]
        assert len(receiver.for_path(path)) == 1
        assert with_second.count() == 0
    finally:
        with_second.stop()


async def test_http_reads_at_most_the_response_cap_of_a_huge_body(
    http: HttpEgress, tune: Callable[..., Settings]
) -> None:
    tune(http_max_response_bytes=65536)
    written = {"bytes": 0}
    finished = threading.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200)
        response.content_length = 50 * MB
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while written["bytes"] < 50 * MB:
                await response.write(chunk)
                written["bytes"] += len(chunk)
        except ConnectionError:
            pass  # the client hung up: what we want
        finally:
            finished.set()
        return response

    with AioServer(huge) as server:
        started = time.monotonic()
        [result] = await http.send(message(), channel(), [principal(1, endpoint=server.url())])
        elapsed = time.monotonic() - started
        await poll(finished.is_set)

    assert result.success and result.status_code == 200
    assert elapsed < 5
    # Socket buffers take some; the rest of the 50 MB is never pulled.
    assert written["bytes"] < 20 * MB, written


async def test_http_deadline_bounds_a_byte_dripping_server(
    http: HttpEgress, tune: Callable[..., Settings]
) -> None:
    tune(http_deadline=2.0)
    with Dripper() as dripper:
        started = time.monotonic()
        [result] = await http.send(
            message(), channel(), [principal(1, endpoint=f"http://127.0.0.1:{dripper.port}/")]
        )
        elapsed = time.monotonic() - started

    assert dripper.bytes_sent >= 1  # it was answering, just slowly
    assert elapsed < 4
    assert (result.success, result.permanent, result.status_code) == (False, False, None)
    assert "2s" in result.errors[0], result.errors


async def test_http_connection_refused_is_transient(http: HttpEgress) -> None:
    [result] = await http.send(
        message(), channel(), [principal(1, endpoint=f"http://127.0.0.1:{free_port()}/hook")]
    )

    assert (result.success, result.permanent, result.status_code) == (False, False, None)
    assert "connection failed" in result.errors[0]


async def test_http_missing_or_bad_endpoint_is_permanent(http: HttpEgress) -> None:
    results = await http.send(
        message(), channel(), [principal(1), principal(2, endpoint="ftp://example.com/x")]
    )

    assert [(r.subscriber_id, r.success, r.permanent) for r in results] == [
        (1, False, True),
        (2, False, True),
    ]
    assert "'endpoint'" in results[0].errors[0]


async def test_ssrf_guard_refuses_loopback_when_not_allowed(
    http: HttpEgress, receiver: WebhookReceiver, tune: Callable[..., Settings]
) -> None:
    tune(egress_allow_cidrs="")
    by_ip, by_name = unique("ip"), unique("name")

    results = await http.send(
        message(),
        channel(),
        [
            principal(1, endpoint=receiver.url(by_ip)),
            principal(2, endpoint=f"http://localhost:{receiver.port}{by_name}"),
        ],
    )

    for result in results:
        assert (result.success, result.permanent) == (False, True), result
        assert "loopback" in result.errors[0], result.errors
    assert receiver.for_path(by_ip) == [] and receiver.for_path(by_name) == []


@pytest.fixture
async def no_egress(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every connect and refuse it, so no packet can leave this host."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connecting to {address}")

    async def refuse_async(sock: socket.socket, address: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connecting to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(asyncio.get_running_loop(), "sock_connect", refuse_async)
    return attempts


async def test_ssrf_guard_refuses_private_literals_before_connecting(
    http: HttpEgress, tune: Callable[..., Settings], no_egress: list[object]
) -> None:
    tune(egress_allow_cidrs="")
    urls = ["http://10.0.0.1/hook", "http://169.254.169.254/latest", "http://[::ffff:10.0.0.1]/x"]

    results = await http.send(
        message(), channel(), [principal(i, endpoint=u) for i, u in enumerate(urls)]
    )

    assert [(r.success, r.permanent) for r in results] == [(False, True)] * 3
    assert "private" in results[0].errors[0] and "link-local" in results[1].errors[0]
    assert no_egress == []


async def test_ssrf_guard_lets_a_public_address_through_to_connect(
    http: HttpEgress, tune: Callable[..., Settings], no_egress: list[object]
) -> None:
    tune(egress_allow_cidrs="", http_connect_timeout=2.0)

    [result] = await http.send(
        message(), channel(), [principal(1, endpoint="http://8.8.8.8:9/hook")]
    )

    assert [a[0] for a in no_egress if isinstance(a, tuple)] == ["8.8.8.8"]  # type: ignore[index]
    assert (result.success, result.permanent) == (False, False)


async def test_each_guard_layer_refuses_on_its_own(tune: Callable[..., Settings]) -> None:
    """The resolver drops blocked answers; the socket factory checks the address
    actually dialled, whatever resolved it (DNS rebinding, IP literals)."""
    tune(egress_allow_cidrs="")
    resolver = _GuardedResolver()
    try:
        with pytest.raises(EgressBlocked, match="loopback"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    for address in ("10.0.0.1", "169.254.169.254", "127.0.0.1"):
        with pytest.raises(EgressBlocked):
            _guarded_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 80)))
    with pytest.raises(EgressBlocked):
        _guarded_socket((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", 80, 0, 0)))

    tune(egress_allow_cidrs="127.0.0.0/8")
    resolver = _GuardedResolver()
    try:
        answers = await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    assert answers and {a["host"] for a in answers} <= {"127.0.0.1"}
    _guarded_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))).close()


BLOCKED = [
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "169.254.169.254",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",
    "64:ff9b:1::1",
    "2002:a00:1::1",
    "::127.0.0.1",
    "fe80::1",
    "fe80::1%2",
    "fc00::1",
    "fd12:3456::1",
    "100.64.0.1",
    "198.18.0.1",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "0.0.0.0",
    "::",
    "192.0.2.1",
    "203.0.113.9",
    "2001:db8::1",
    "240.0.0.1",
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize("address", BLOCKED)
def test_blocked_reason_refuses_non_public_addresses(
    address: str, tune: Callable[..., Settings]
) -> None:
    tune(egress_allow_cidrs="")

    reason = blocked_reason(address)

    assert reason is not None and reason.strip(), address


@pytest.mark.parametrize("address", ALLOWED)
def test_blocked_reason_allows_public_addresses(
    address: str, tune: Callable[..., Settings]
) -> None:
    tune(egress_allow_cidrs="")

    assert blocked_reason(address) is None


def test_blocked_reason_names_the_range_and_the_allow_list_is_the_way_through(
    tune: Callable[..., Settings],
) -> None:
    tune(egress_allow_cidrs="")
    assert "loopback" in (blocked_reason("127.0.0.1") or "")
    assert "loopback" in (blocked_reason("::ffff:127.0.0.1") or "")
    assert "link-local" in (blocked_reason("169.254.169.254") or "")
    assert "private" in (blocked_reason("64:ff9b::a00:1") or "")

    tune(egress_allow_cidrs="127.0.0.0/8, 10.1.0.0/16")
    assert blocked_reason("127.0.0.1") is None
    assert blocked_reason("10.1.2.3") is None
    assert blocked_reason("10.2.0.1") is not None  # only the listed range
    assert blocked_reason("::1") is not None  # an IPv4 range says nothing of IPv6


# -- email against a real SMTP server -------------------------------------------------


async def test_email_is_delivered_with_a_stable_message_id_and_headers(
    smtp: SmtpReceiver, mail_settings: Settings
) -> None:
    to = f"{uuid.uuid4().hex[:8]}@example.com"
    subscriber = principal(5, delivery_id=77, email=to)

    [result] = await EmailEgress().send(
        message("Body text", mid=9), channel("Weekly news"), [subscriber]
    )

    assert (result.success, result.status_code, result.subscriber_id) == (True, 250, 5)
    [mail] = smtp.to(to)
    parsed = mail.message
    assert parsed["Message-ID"] == "<dlv-77@example.test>"
    assert (parsed["From"], parsed["To"], parsed["Subject"]) == (
        "alerts@example.test",
        to,
        "Weekly news",
    )
    assert parsed["X-Channels-Message-Id"] == "9"
    assert mail.mail_from == "alerts@example.test" and mail.rcpt_tos == [to]
    assert "Body text" in parsed.get_payload(decode=True).decode()


async def test_email_without_a_delivery_id_derives_the_message_id(
    smtp: SmtpReceiver, mail_settings: Settings
) -> None:
    to = f"{uuid.uuid4().hex[:8]}@example.com"

    [result] = await EmailEgress().send(message(mid=12), channel(), [principal(6, email=to)])

    assert result.success
    [mail] = smtp.to(to)
    assert mail.message["Message-ID"] == "<msg-12.6@example.test>"


async def test_email_refuses_crlf_in_headers_permanently(
    smtp: SmtpReceiver, mail_settings: Settings
) -> None:
    before = smtp.count()
    injected = channel("Alerts\r\nBcc: victim@example.com")
    by_alias = channel("Alerts")
    by_alias.aliases = {"email_subject": "Hi\nBcc: victim@example.com"}
    to = f"{uuid.uuid4().hex[:8]}@example.com"

    [title] = await EmailEgress().send(message(), injected, [principal(1, email=to)])
    [alias] = await EmailEgress().send(message(), by_alias, [principal(2, email=to)])
    [address] = await EmailEgress().send(
        message(), channel(), [principal(3, email=f"{to}\r\nBcc: victim@example.com")]
    )

    for result in (title, alias):
        assert (result.success, result.permanent) == (False, True)
        assert "Subject" in result.errors[0]
    assert (address.success, address.permanent) == (False, True)
    assert smtp.count() == before


async def test_email_rcpt_4xx_is_transient_and_5xx_permanent(
    smtp: SmtpReceiver, mail_settings: Settings
) -> None:
    later, never = (f"{uuid.uuid4().hex[:8]}@example.com" for _ in range(2))
    smtp.refuse(later, ["451 4.7.1 try again later"])
    smtp.refuse(never, ["550 5.1.1 no such user"])

    results = await EmailEgress().send(
        message(), channel(), [principal(1, email=later), principal(2, email=never)]
    )

    assert [(r.success, r.permanent, r.status_code) for r in results] == [
        (False, False, 451),
        (False, True, 550),
    ]
    assert "451" in results[0].errors[0] and "550" in results[1].errors[0]
    assert smtp.to(later) == [] and smtp.to(never) == []


async def test_email_one_refused_recipient_leaves_the_others_delivered(
    smtp: SmtpReceiver, mail_settings: Settings
) -> None:
    a, b, c = (f"{n}-{uuid.uuid4().hex[:8]}@example.com" for n in "abc")
    smtp.refuse(b, ["550 5.1.1 no such user"])

    results = await EmailEgress().send(
        message(),
        channel(),
        [
            principal(1, delivery_id=11, email=a),
            principal(2, delivery_id=12, email=b),
            principal(3, delivery_id=13, email=c),
        ],
    )

    assert [(r.subscriber_id, r.success, r.permanent) for r in results] == [
        (1, True, False),
        (2, False, True),
        (3, True, False),
    ]
    assert [m.message["Message-ID"] for m in smtp.to(a) + smtp.to(c)] == [
        "<dlv-11@example.test>",
        "<dlv-13@example.test>",
    ]
    assert smtp.to(b) == []


async def test_email_server_hanging_up_mid_batch_leaves_the_rest_to_retry(
    smtp: SmtpReceiver, mail_settings: Settings
) -> None:
    a, b, c = (f"{n}-{uuid.uuid4().hex[:8]}@example.com" for n in "abc")
    smtp.refuse(b, ["421 4.3.2 shutting down"])  # 421: the client must hang up

    results = await EmailEgress().send(
        message(), channel(), [principal(1, email=a), principal(2, email=b), principal(3, email=c)]
    )

    assert [(r.subscriber_id, r.success, r.permanent) for r in results] == [
        (1, True, False),
        (2, False, False),
        (3, False, False),
    ]
    assert results[1].status_code == 421
    assert "closed the connection" in results[2].errors[0]
    assert len(smtp.to(a)) == 1 and smtp.to(b) == [] and smtp.to(c) == []


async def test_email_to_an_unreachable_server_is_transient(tune: Callable[..., Settings]) -> None:
    tune(smtp_host="127.0.0.1", smtp_port=free_port(), smtp_timeout=5)

    results = await EmailEgress().send(
        message(), channel(), [principal(1, email="a@example.com"), principal(2)]
    )

    assert [(r.success, r.permanent) for r in results] == [(False, False), (False, True)]
    assert "SMTP connect" in results[0].errors[0]
    assert "'email'" in results[1].errors[0]


# -- the queue transport against the embedded Valkey ---------------------------------


async def test_queue_publishes_an_envelope_per_delivery(
    broker_url: str, tune: Callable[..., Settings]
) -> None:
    tune(queue_url=broker_url)
    first, second = f"q-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    consumer = QueueConsumer(broker_url, [first, second]).start()
    try:
        results = await QueueEgress().send(
            message("queued!", mid=21),
            channel("Feed", cid=4),
            [
                principal(1, delivery_id=501, queue=first),
                principal(2, delivery_id=502, queue=second),
                principal(3, delivery_id=503),
                principal(4, delivery_id=504, queue="no spaces allowed"),
            ],
        )
        await poll(lambda: consumer.count() >= 2)
    finally:
        consumer.stop()

    assert [(r.subscriber_id, r.success, r.permanent) for r in results] == [
        (1, True, False),
        (2, True, False),
        (3, False, True),
        (4, False, True),
    ]
    assert "'queue'" in results[2].errors[0]
    [one] = consumer.for_queue(first)
    [two] = consumer.for_queue(second)
    assert (one["id"], one["delivery_id"], one["subscriber_id"]) == ("dlv_501", 501, 1)
    assert two["id"] == "dlv_502"
    assert one["data"] == {
        **one["data"],
        "content": "queued!",
        "message_id": 21,
        "channel_id": 4,
        "channel": "Feed",
    }
    assert consumer.count() == 2


async def test_queue_with_an_unreachable_broker_is_transient(tune: Callable[..., Settings]) -> None:
    tune(queue_url=f"redis://127.0.0.1:{free_port()}/0")

    [result] = await QueueEgress().send(message(), channel(), [principal(1, queue="somewhere")])

    assert (result.success, result.permanent) == (False, False)
    assert "queue broker unreachable" in result.errors[0], result.errors


def test_transport_results_are_what_the_worker_records() -> None:
    ok = TransportResult.delivered(3, status_code=200)
    bad = TransportResult.failed(4, "nope", permanent=True, status_code=404)

    assert (ok.success, ok.delivered_count, ok.final) == (True, 1, True)
    assert (bad.success, bad.failed_count, bad.errors, bad.permanent) == (False, 1, ["nope"], True)
