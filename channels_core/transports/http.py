"""HTTP webhook egress: signed POSTs to each subscriber's ``endpoint``.

One aiohttp session per process and event loop (keep-alive, a bounded pool),
so the pipeline, not the client, sets the pace: aiohttp measured 5.5-6.2k
req/s here against 0.4-1k for stock httpx. Every request has a connect
timeout, a read timeout and an overall deadline that a byte-dripping server
cannot stretch; at most ``http_max_response_bytes`` of the answer are read;
redirects are never followed; every address dialled passes the SSRF guard.

Status classification: 2xx delivered; 408, 429 and 5xx transient (with
``Retry-After`` honoured); any other status, a blocked address or a bad URL
permanent. Connection errors and timeouts are transient.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from channels_core.errors import ValidationError
from channels_core.secrets import signing_secrets
from channels_core.settings import get_settings
from channels_core.signing import new_secret, signature_headers
from channels_core.ssrf import EgressBlocked, blocked_reason, check_address
from channels_core.transports.base import EgressTransport, TransportResult, event_data
from channels_core.validation import check_endpoint_url

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["HttpEgress", "webhook_payload", "webhook_id", "classify_status", "parse_retry_after"]

USER_AGENT = "channels-delivery/0.1 (+webhooks)"


def webhook_id(delivery_id: int | None, message_id: int | None, subscriber_id: int | None) -> str:
    """The Standard Webhooks ``webhook-id``: stable across retries of one delivery."""
    if delivery_id is not None:
        return f"dlv_{delivery_id}"
    return f"msg_{message_id}_{subscriber_id}"


def webhook_payload(message: Message, channel: Channel) -> bytes:
    created = message.created_at or datetime.now(UTC)
    body = {
        "type": "message.created",
        "timestamp": created.isoformat(),
        "data": event_data(message, channel),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify_status(status: int) -> str:
    """``delivered``, ``transient`` or ``permanent`` for an HTTP status."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or status >= 500:
        return "transient"
    return "permanent"


@lru_cache(maxsize=4096)
def _url_problem(url: str, allow_cidrs: str) -> str | None:
    """Why ``url`` may not be posted to, checked once per URL and allow-list:
    syntax, scheme, and an IP literal the guard refuses (hostnames are
    checked at connect time, after DNS)."""
    try:
        check_endpoint_url(url)
        host = urlsplit(url).hostname or ""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return None
        check_address(str(literal))
    except (ValidationError, EgressBlocked) as exc:
        return str(exc)
    return None


class _GuardedResolver(AbstractResolver):
    """Drops resolved addresses the SSRF guard refuses; fails if none is left."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if blocked_reason(r["host"]) is None]
        if not allowed:
            reasons = "; ".join(sorted({str(blocked_reason(r["host"])) for r in results}))
            raise EgressBlocked(f"refused to connect to {host}: {reasons}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _guarded_socket(addr_info: Any) -> socket.socket:
    # The last word: the address about to be dialled, whatever resolved it.
    family, type_, proto, _, sockaddr = addr_info
    check_address(sockaddr[0])
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setblocking(False)
    if family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class HttpEgress(EgressTransport):
    """POST the signed payload to every subscriber's ``endpoint`` alias."""

    name = "http"
    # Aliases the worker fills (and saves) before the first send.
    generated_aliases = {"webhook_secret": new_secret}

    def __init__(self) -> None:
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def is_available(self) -> bool:
        return True

    def endpoint(self, subscriber: Principal) -> str | None:
        url = subscriber.get_alias("endpoint")
        return url.strip() if isinstance(url, str) and url.strip() else None

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            settings = get_settings()
            connector = aiohttp.TCPConnector(
                limit=settings.http_pool_size,
                limit_per_host=settings.http_pool_size,
                resolver=_GuardedResolver(),
                socket_factory=_guarded_socket,
                ttl_dns_cache=60,
                keepalive_timeout=30,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=settings.http_deadline,
                    sock_connect=settings.http_connect_timeout,
                    sock_read=settings.http_read_timeout,
                ),
                headers={"User-Agent": USER_AGENT},
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
            )
            self._sessions[loop] = session
        return session

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        session = self._sessions.pop(loop, None)
        if session is not None:
            await session.close()

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        body = webhook_payload(message, channel)
        limit = asyncio.Semaphore(max(1, get_settings().max_in_flight))

        async def one(subscriber: Principal) -> TransportResult:
            async with limit:
                return await self._post(message, subscriber, body)

        return list(await asyncio.gather(*(one(s) for s in subscribers)))

    async def _post(self, message: Message, subscriber: Principal, body: bytes) -> TransportResult:
        settings = get_settings()
        sid = subscriber.id
        url = subscriber.get_alias("endpoint")
        if not url:
            return TransportResult.failed(
                sid, f"subscriber {sid} has no 'endpoint' alias", permanent=True
            )
        problem = _url_problem(url, settings.egress_allow_cidrs)
        if problem is not None:
            return TransportResult.failed(sid, problem, permanent=True)
        # The current secret, and during a rotation's overlap the previous one too.
        secrets_ = signing_secrets(subscriber.aliases)
        msg_id = webhook_id(subscriber.delivery_id, message.id, sid)
        headers = {"Content-Type": "application/json"}
        if secrets_:
            headers.update(signature_headers(secrets_, msg_id, int(time.time()), body))
        else:
            headers["webhook-id"] = msg_id
        started = time.perf_counter()
        try:
            # The session's ClientTimeout(total=http_deadline) bounds the whole
            # exchange, body included, so a dripping server cannot stretch it.
            async with self._session().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                # Read at most the cap; the rest is never pulled off the socket.
                await response.content.read(settings.http_max_response_bytes)
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except aiohttp.ClientConnectorError as exc:
            latency = (time.perf_counter() - started) * 1000
            if isinstance(exc.os_error, EgressBlocked) or "refused to connect" in str(exc):
                return TransportResult.failed(
                    sid, str(exc.os_error), permanent=True, latency_ms=latency
                )
            return TransportResult.failed(sid, f"connection failed: {exc}", latency_ms=latency)
        except aiohttp.InvalidURL as exc:
            # The URL will not get better by waiting.
            return TransportResult.failed(sid, f"invalid endpoint URL: {exc}", permanent=True)
        except TimeoutError:
            latency = (time.perf_counter() - started) * 1000
            return TransportResult.failed(
                sid, f"no complete answer within {settings.http_deadline:g}s", latency_ms=latency
            )
        except (aiohttp.ClientError, OSError) as exc:
            latency = (time.perf_counter() - started) * 1000
            return TransportResult.failed(sid, f"{type(exc).__name__}: {exc}", latency_ms=latency)
        latency = (time.perf_counter() - started) * 1000
        outcome = classify_status(status)
        if outcome == "delivered":
            return TransportResult.delivered(sid, status_code=status, latency_ms=latency)
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        else:
            error = f"HTTP {status}"
        return TransportResult.failed(
            sid,
            error,
            permanent=outcome == "permanent",
            status_code=status,
            retry_after=retry_after,
            latency_ms=latency,
        )
