"""The HTTP/1.1 client under the webhook transport: POST, read the status, move on.

Why not aiohttp: a webhook POST needs a status line, a few headers and the
body's end, and aiohttp spent ~28% of a worker's CPU getting them (request
and payload objects, timeout contexts, a task per request). This client is an
``asyncio.Protocol`` per connection that parses the answer as the bytes
arrive and resolves one future; it measured ~4x aiohttp's request rate here
on the same loop (uvloop).

What it does:

- one keep-alive pool per client (the transport keeps one client per event
  loop), keyed by (scheme, host, port) and bounded in total; a connection
  goes back to the pool only after its answer was read to the end; one the
  server closed, or one idle longer than ``KEEPALIVE_TIMEOUT``, is dropped;
- every address dialled passes the SSRF guard (``channels_core.ssrf``) after
  DNS and again at connect, whatever resolved it; refused addresses are
  dropped, and the request fails permanently when none is left;
- a connect timeout, a read timeout (the longest silence) and an overall
  deadline that a byte-dripping server cannot stretch;
- at most ``max_body`` bytes of the answer's body are read (and dropped: the
  caller wants the status); a longer body closes the connection instead of
  draining it. Content-Length, chunked and close-delimited bodies;
- https with ``ssl.create_default_context()`` (verification, SNI).

What it must never do: follow a redirect, send a request on a connection
whose previous answer is not complete, or dial an address the guard refuses.

Failures are raised as ``TransientDeliveryError`` (worth retrying: timeouts,
refused or reset connections, garbled answers) or ``PermanentDeliveryError``
(a refused address, a URL that cannot be sent to), each with the sentence the
attempt row records.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypedDict, cast
from urllib.parse import quote, urlsplit

from channels_core.errors import PermanentDeliveryError, TransientDeliveryError
from channels_core.ssrf import EgressBlocked, blocked_reason, check_address

__all__ = [
    "HttpClient",
    "Response",
    "GuardedResolver",
    "ResolvedAddress",
    "guarded_socket",
    "KEEPALIVE_TIMEOUT",
]

# Idle keep-alive connections older than this are closed rather than reused:
# most servers close theirs after 5-75 s, and a socket the server already
# gave up on costs a failed write and a retry.
KEEPALIVE_TIMEOUT = 30.0
# Resolved addresses are reused this long; the guard checks every dial anyway.
DNS_TTL = 60.0
# A status line plus headers longer than this is not an answer worth parsing.
MAX_HEAD_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 4096

# (family, type, proto, canonname, sockaddr), as getaddrinfo answers.
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
PoolKey = tuple[str, str, int]


class ResolvedAddress(TypedDict):
    hostname: str
    host: str
    port: int
    family: int
    proto: int
    flags: int
    sockaddr: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Response:
    """An answer: ``headers`` has lower-case names (repeats joined by ", ");
    the body was counted, not kept; ``truncated`` when it was over the cap."""

    status: int
    reason: str
    headers: dict[str, str]
    body_bytes: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class _Target:
    key: PoolKey
    host: str  # what DNS is asked (IDNA-encoded), or the IP literal
    port: int
    literal: bool
    tls: bool
    host_line: bytes  # b"Host: example.com:8080\r\n"


def guarded_socket(addr_info: AddrInfo) -> socket.socket:
    """A non-blocking TCP socket for ``addr_info``, if the guard lets its address be dialled.

    The last word: the address about to be dialled, whatever resolved it.
    """
    family, type_, proto, _, sockaddr = addr_info
    check_address(sockaddr[0])
    sock = socket.socket(family=family, type=type_, proto=proto)
    try:
        sock.setblocking(False)
        if family in (socket.AF_INET, socket.AF_INET6):
            # A POST goes out in one write; waiting for an ACK only adds latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


class GuardedResolver:
    """DNS that drops the addresses the SSRF guard refuses; fails if none is left."""

    async def infos(self, host: str, port: int) -> list[AddrInfo]:
        """Every address the guard lets through, as ``getaddrinfo`` tuples."""
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        return _allowed(host, found)

    async def resolve(
        self, host: str, port: int = 0, family: int = socket.AF_UNSPEC
    ) -> list[ResolvedAddress]:
        infos = await self.infos(host, port)
        return [
            ResolvedAddress(
                hostname=host,
                host=info[4][0],
                port=info[4][1],
                family=info[0],
                proto=info[2],
                flags=0,
                sockaddr=info[4],
            )
            for info in infos
            if family == socket.AF_UNSPEC or info[0] == family
        ]

    async def close(self) -> None:
        """Nothing held: the loop's resolver does the work."""


def _allowed(host: str, found: Iterable[AddrInfo]) -> list[AddrInfo]:
    allowed: list[AddrInfo] = []
    reasons: set[str] = set()
    for info in found:
        if info[1] != socket.SOCK_STREAM or info[0] not in (socket.AF_INET, socket.AF_INET6):
            continue
        reason = blocked_reason(info[4][0])
        if reason is None:
            if info not in allowed:
                allowed.append(info)
        else:
            reasons.add(reason)
    if not allowed:
        why = "; ".join(sorted(reasons)) or "no address"
        raise EgressBlocked(f"refused to connect to {host}: {why}")
    return allowed


_TARGET_SAFE = "/%:@!$&'()*+,;=-._~?"
_PATH_START = re.compile(r"[/?#]")


def split_origin(url: str) -> tuple[str, str] | None:
    """``url`` cut where ``urlsplit`` ends the netloc: ``("http://h:1", "/p?q")``.

    A fan-out's endpoints mostly share a few origins and differ in the path;
    what depends on the origin (host, port, the guard's view of an IP
    literal) is then worked out once per origin. ``None`` without "://".
    """
    at = url.find("://")
    if at <= 0:
        return None
    found = _PATH_START.search(url, at + 3)
    if found is None:
        return url, ""
    return url[: found.start()], url[found.start() :]


@lru_cache(maxsize=4096)
def _parse(url: str) -> tuple[_Target, bytes]:
    """What a URL means on the wire: where to connect, and the request's first lines."""
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError as exc:
        raise PermanentDeliveryError(f"invalid endpoint URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not hostname:
        raise PermanentDeliveryError(f"invalid endpoint URL: {url!r} is not an http(s) URL")
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    port = port or default_port
    literal = False
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        try:
            host = hostname.encode("idna").decode("ascii") if not hostname.isascii() else hostname
        except UnicodeError as exc:
            raise PermanentDeliveryError(f"invalid endpoint URL: host {hostname!r}: {exc}") from exc
        host_header = host
    else:
        literal = "%" not in hostname
        host = str(address) if literal else hostname
        host_header = f"[{host}]" if address.version == 6 else host
    if port != default_port:
        host_header = f"{host_header}:{port}"
    path = parts.path or "/"
    target = f"{path}?{parts.query}" if parts.query else path
    if not target.isascii() or any(c in target for c in " \t\r\n"):
        target = quote(target, safe=_TARGET_SAFE)
    try:
        host_line = f"Host: {host_header}\r\n".encode("ascii")
        head = f"POST {target} HTTP/1.1\r\n".encode("ascii") + host_line
    except UnicodeError as exc:
        raise PermanentDeliveryError(f"invalid endpoint URL: {exc}") from exc
    return _Target((parts.scheme, host, port), host, port, literal, tls, host_line), head


def _route(url: str) -> tuple[_Target, bytes]:
    """``_parse(url)``, with the origin's part cached once for all its paths."""
    split = split_origin(url)
    if split is None:
        return _parse(url)
    origin, rest = split
    if not rest.isascii() or " " in rest or "\t" in rest or "\r" in rest or "\n" in rest:
        return _parse(url)  # urlsplit's clean-up and percent-encoding: the slow road
    try:
        target = _parse(origin)[0]
    except PermanentDeliveryError:
        return _parse(url)  # the same refusal, worded with the whole URL
    if "#" in rest:
        rest = rest[: rest.index("#")]
    if not rest or rest[0] == "?":
        rest = "/" + rest
    return target, b"POST " + rest.encode("ascii") + b" HTTP/1.1\r\n" + target.host_line


@lru_cache(maxsize=1)
def default_ssl_context() -> ssl.SSLContext:
    """Certificate and host-name verification on, HTTP/1.1 offered by ALPN."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


# -- one connection --------------------------------------------------------------------

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_EOF = range(7)


class _ReadTimeout(TimeoutError):
    pass


class _Deadline(TimeoutError):
    pass


class _BadAnswer(ValueError):
    pass


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: sends a request, parses the answer as it arrives.

    At most one request is in flight; ``reusable`` says whether the last
    answer left the connection ready for the next request.
    """

    def __init__(self, client: HttpClient, key: PoolKey) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.discarded = False
        self.reusable = False
        self.idle_since = 0.0
        self.received = 0  # bytes of the current answer so far
        self._loop = client.loop
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._read_timeout = 0.0
        self._last_read = 0.0
        self._buf = bytearray()
        self._state = _HEAD
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._keep_alive = False
        self._remaining = 0
        self._body = 0
        self._cap = 0

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for (a late or unsolicited answer): whatever
            # this connection says next cannot be matched to a request.
            self.abort()
            return
        self.received += len(data)
        self._last_read = self._loop.time()
        try:
            self._feed(data)
        except _BadAnswer as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.transport = None
        self.client._lost(self)

    # used by the client

    def send(
        self, data: bytes, cap: int, read_timeout: float, deadline: float
    ) -> asyncio.Future[Response]:
        assert self.transport is not None
        loop = self._loop
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiter = waiter
        self.received = 0
        self.reusable = False
        self._state = _HEAD
        self._buf.clear()
        self._body = 0
        self._cap = cap
        self._deadline = deadline
        self._read_timeout = read_timeout
        now = loop.time()
        self._last_read = now
        self._timer = loop.call_at(min(deadline, now + read_timeout), self._on_timer)
        self.transport.write(data)
        return waiter

    def abort(self) -> None:
        self.closed = True
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    # internals

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        now = self._loop.time()
        if now >= self._deadline:
            self._fail(_Deadline())
        elif now - self._last_read >= self._read_timeout:
            self._fail(_ReadTimeout())
        else:
            when = min(self._deadline, self._last_read + self._read_timeout)
            self._timer = self._loop.call_at(when, self._on_timer)

    def _ended(self, exc: Exception | None) -> None:
        """The server closed (EOF) or the connection broke."""
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._state == _UNTIL_EOF and exc is None:
            self._finish(False)
        elif self.received == 0:
            self._fail(ConnectionResetError("the server closed the connection before answering"))
        else:
            self._fail(ConnectionResetError("the server closed the connection mid-answer"))

    def _fail(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, reusable: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.reusable = reusable and self._keep_alive and not self.closed
        waiter = self._waiter
        truncated = self._body > self._cap
        if not self.reusable:
            self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_result(
                Response(self._status, self._reason, self._headers, self._body, truncated)
            )

    def _feed(self, data: bytes) -> None:
        state = self._state
        if state == _HEAD:
            buf = self._buf
            if buf:
                buf += data
                data = bytes(buf)
                buf.clear()
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD_BYTES:
                    raise _BadAnswer(f"status line and headers over {MAX_HEAD_BYTES} bytes")
                buf += data
                return
            self._head(data[:end])
            rest = data[end + 4 :]
            state = self._state
            if state == _HEAD:  # an interim 1xx answer: the real one follows
                if rest:
                    self._feed(rest)
                return
            if state == _LENGTH and self._remaining == 0:
                self._finish(not rest)
                return
            if not rest:
                return
            data = rest
        if state == _LENGTH:
            n = len(data)
            if n >= self._remaining:
                self._body += self._remaining
                # Bytes past the declared length mean the framing is not what we think.
                self._finish(n == self._remaining)
                return
            self._remaining -= n
            self._body += n
            if self._body > self._cap:
                self._finish(False)
        elif state == _UNTIL_EOF:
            self._body += len(data)
            if self._body > self._cap:
                self._finish(False)
        else:
            self._chunked(data)

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise _BadAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                raise _BadAnswer(f"malformed header line: {line[:80]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip(b" \t").decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if 100 <= status < 200 and status != 101:
            return  # stay in _HEAD
        self._status = status
        self._reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        self._headers = headers
        connection = headers.get("connection", "").lower()
        if parts[0] == b"HTTP/1.1":
            self._keep_alive = "close" not in connection
        else:
            self._keep_alive = "keep-alive" in connection
        if status in (204, 304) or status == 101:
            self._keep_alive = self._keep_alive and status != 101
            self._state, self._remaining = _LENGTH, 0
            return
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if "content-length" in headers:
                # Both framings at once: read it as chunked but never reuse.
                self._keep_alive = False
            if coding.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_EOF
                self._keep_alive = False
            return
        length = headers.get("content-length")
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            declared = values.pop()
            if values or not (declared.isascii() and declared.isdigit()):
                raise _BadAnswer(f"bad Content-Length: {length[:40]!r}")
            self._state, self._remaining = _LENGTH, int(declared)
            return
        self._state = _UNTIL_EOF
        self._keep_alive = False

    def _chunked(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _CHUNK_DATA:
                take = min(self._remaining, len(buf))
                del buf[:take]
                self._remaining -= take
                self._body += take
                if self._body > self._cap:
                    self._finish(False)
                    return
                if self._remaining:
                    return
                self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise _BadAnswer("chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            else:  # _CHUNK_SIZE or _TRAILER: a line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_CHUNK_LINE:
                        raise _BadAnswer("chunk size or trailer line too long")
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if state == _TRAILER:
                    if not line:
                        self._finish(not buf)
                        return
                    continue
                size = line.split(b";", 1)[0].strip()
                if not size or size.strip(b"0123456789abcdefABCDEF"):
                    raise _BadAnswer(f"bad chunk size: {line[:40]!r}")
                self._remaining = int(size, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILER


# -- the pool --------------------------------------------------------------------------


class HttpClient:
    """Keep-alive HTTP/1.1 POSTs for one event loop, at most ``pool_size`` connections.

    ``await client.post(url, headers, body, ...)`` returns a ``Response`` or
    raises ``TransientDeliveryError`` / ``PermanentDeliveryError``::

        client = HttpClient(pool_size=64)
        try:
            answer = await client.post(
                "https://example.com/hook", {"Content-Type": "application/json"}, b"{}",
                connect_timeout=5, read_timeout=15, deadline=30, max_body=65536,
            )
            print(answer.status, answer.headers.get("retry-after"))
        finally:
            await client.aclose()
    """

    def __init__(self, pool_size: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._limit = max(1, pool_size)
        self._ssl = ssl_context
        self._resolver = GuardedResolver()
        self._idle: dict[PoolKey, list[_Connection]] = {}
        self._conns: set[_Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._dns: dict[tuple[str, int], tuple[float, list[AddrInfo]]] = {}
        self._last_sweep = self.loop.time()
        self.closed = False

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = default_ssl_context()
        return self._ssl

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
        deadline: float,
        max_body: int,
    ) -> Response:
        target, head = _route(url)
        text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # One CR and one LF per header line, or a name or value smuggles a line in.
        if text.count("\n") != len(headers) or text.count("\r") != len(headers):
            raise PermanentDeliveryError("a request header holds a line break")
        try:
            extra = text.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise PermanentDeliveryError(f"a request header is not latin-1: {exc}") from exc
        data = b"".join((head, extra, b"Content-Length: %d\r\n\r\n" % len(body), body))
        loop = self.loop
        deadline_at = loop.time() + deadline
        fresh = False
        while True:
            try:
                conn, reused = await self._acquire(target, deadline_at, connect_timeout, fresh)
            except _Deadline:
                raise TransientDeliveryError(f"no complete answer within {deadline:g}s") from None
            try:
                response = await conn.send(data, max_body, read_timeout, deadline_at)
            except BaseException as exc:
                self._release(conn, reusable=False)
                if reused and not fresh and conn.received == 0 and isinstance(exc, ConnectionError):
                    # Servers close idle keep-alive sockets when they like; a
                    # close that crossed our request arrives as EOF or a reset
                    # before any answer byte. One retry on a fresh connection
                    # (deliveries are at-least-once and carry a stable id).
                    fresh = True
                    continue
                if isinstance(exc, _Deadline):
                    raise TransientDeliveryError(
                        f"no complete answer within {deadline:g}s"
                    ) from None
                if isinstance(exc, _ReadTimeout):
                    raise TransientDeliveryError(
                        f"no answer byte for {read_timeout:g}s (read timeout)"
                    ) from None
                if isinstance(exc, _BadAnswer):
                    raise TransientDeliveryError(f"malformed HTTP answer: {exc}") from exc
                if isinstance(exc, OSError):
                    raise TransientDeliveryError(f"connection lost: {exc}") from exc
                raise
            self._release(conn, conn.reusable)
            return response

    async def aclose(self) -> None:
        """Close every connection; requests still in flight fail."""
        self.closed = True
        for conn in list(self._conns):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        # Let the transports run their close callbacks while the loop is alive.
        await asyncio.sleep(0)

    # pool bookkeeping

    async def _acquire(
        self, target: _Target, deadline_at: float, connect_timeout: float, fresh: bool
    ) -> tuple[_Connection, bool]:
        loop = self.loop
        while True:
            if self.closed:
                raise TransientDeliveryError("connection failed: the HTTP client is closed")
            if not fresh:
                idle = self._idle.get(target.key)
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    if conn.closed or now - conn.idle_since > KEEPALIVE_TIMEOUT:
                        self._discard(conn)
                        continue
                    return conn, True
            if len(self._conns) + self._opening < self._limit:
                break
            if self._evict_idle():
                continue
            await self._wait_slot(deadline_at)
        self._opening += 1
        try:
            conn = await self._dial(target, deadline_at, connect_timeout)
        finally:
            self._opening -= 1
            self._wake()
        self._conns.add(conn)
        return conn, False

    async def _wait_slot(self, deadline_at: float) -> None:
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline_at):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # our turn came as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise _Deadline() from None
            raise

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection to make room for another host."""
        oldest: _Connection | None = None
        # Hosts with nothing idle are forgotten here, off the hot path, so a
        # pool that has seen many hosts does not scan them all on every dial.
        for key in [k for k, idle in self._idle.items() if not idle]:
            del self._idle[key]
        for idle in self._idle.values():
            if oldest is None or idle[0].idle_since < oldest.idle_since:
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        self._discard(oldest)
        return True

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not conn.closed and not self.closed:
            now = self.loop.time()
            conn.idle_since = now
            idle = self._idle.get(conn.key)
            if idle is None:
                idle = self._idle[conn.key] = []
            idle.append(conn)
            if now - self._last_sweep > KEEPALIVE_TIMEOUT:
                self._sweep(now)
        else:
            self._discard(conn)
        if self._waiters:
            self._wake()

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for idle in self._idle.values():
            stale = [c for c in idle if c.closed or now - c.idle_since > KEEPALIVE_TIMEOUT]
            for conn in stale:
                idle.remove(conn)
                self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        if not conn.discarded:
            conn.discarded = True
            self._conns.discard(conn)
            conn.abort()

    def _lost(self, conn: _Connection) -> None:
        """The connection closed: drop it from the idle list it may sit in."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            self._discard(conn)
            if self._waiters:
                self._wake()

    # dialling

    async def _dial(
        self, target: _Target, deadline_at: float, connect_timeout: float
    ) -> _Connection:
        loop = self.loop
        left = deadline_at - loop.time()
        try:
            async with asyncio.timeout(min(connect_timeout, left)):
                infos = await self._addresses(target)
                return await self._connect(target, infos)
        except TimeoutError:
            if left <= connect_timeout:
                raise _Deadline() from None
            raise TransientDeliveryError(
                f"connection failed: no connection within {connect_timeout:g}s"
            ) from None
        except EgressBlocked as exc:
            raise PermanentDeliveryError(str(exc)) from exc
        except socket.gaierror as exc:
            raise TransientDeliveryError(
                f"connection failed: cannot resolve {target.host}: {exc}"
            ) from exc
        except ssl.SSLError as exc:
            raise TransientDeliveryError(f"connection failed: TLS: {exc}") from exc
        except OSError as exc:
            raise TransientDeliveryError(f"connection failed: {exc}") from exc

    async def _addresses(self, target: _Target) -> list[AddrInfo]:
        if target.literal:
            family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
            sockaddr: tuple[Any, ...] = (
                (target.host, target.port, 0, 0)
                if family == socket.AF_INET6
                else (target.host, target.port)
            )
            info: AddrInfo = (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)
            return _allowed(target.host, [info])
        now = self.loop.time()
        key = (target.host, target.port)
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return _allowed(target.host, cached[1])
        found = await self.loop.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        if len(self._dns) > 1024:
            self._dns.clear()
        self._dns[key] = (now + DNS_TTL, list(found))
        return _allowed(target.host, found)

    async def _connect(self, target: _Target, infos: list[AddrInfo]) -> _Connection:
        loop = self.loop
        last: OSError | None = None
        for info in infos:
            sock = guarded_socket(info)
            try:
                await loop.sock_connect(sock, info[4])
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, target.key),
                    sock=sock,
                    ssl=self.ssl_context if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
            except BaseException:
                sock.close()
                raise
            return conn
        assert last is not None
        raise last
