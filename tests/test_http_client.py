"""The webhook transport's HTTP/1.1 client against real servers on 127.0.0.1.

Each server is a few lines of raw asyncio in the test's own loop, so a test
says byte for byte what the peer does: keep-alive, closing idle sockets,
chunked and oversized bodies, dripping answers, a full accept queue. The SSRF
tests intercept ``connect`` itself (record and refuse), so nothing leaves
loopback even if the guard were broken.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from channels_core.errors import PermanentDeliveryError, TransientDeliveryError
from channels_core.settings import configure, get_settings
from channels_core.transports import http_client
from channels_core.transports.http_client import HttpClient, Response

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Server:
    """A raw TCP server in the test's loop: counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            try:
                await self._handler(self, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request off the wire (head and Content-Length body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """Answer each request on a connection with the next of ``answers`` (the last repeats)."""

    async def handler(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        n = 0
        while await server.read_request(reader) is not None:
            writer.write(answers[min(n, len(answers) - 1)])
            await writer.drain()
            n += 1
            if then_close:
                return

    return handler


async def serving(handler: Handler) -> Server:
    return await Server(handler).__aenter__()


@pytest.fixture
def loopback() -> Iterator[None]:
    previous = get_settings()
    configure(previous, egress_allow_cidrs="127.0.0.0/8")
    yield
    configure(previous)


@pytest.fixture
async def client(loopback: None) -> AsyncIterator[HttpClient]:
    c = HttpClient(pool_size=4)
    yield c
    await c.aclose()


async def post(
    client: HttpClient,
    url: str,
    *,
    body: bytes = b'{"a":1}',
    connect_timeout: float = 2.0,
    read_timeout: float = 5.0,
    deadline: float = 10.0,
    max_body: int = 65536,
    headers: dict[str, str] | None = None,
) -> Response:
    return await client.post(
        url,
        headers if headers is not None else {"Content-Type": "application/json"},
        body,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        deadline=deadline,
        max_body=max_body,
    )


# -- the request on the wire, keep-alive ------------------------------------------------


async def test_request_carries_host_length_and_the_given_headers(client: HttpClient) -> None:
    server = await serving(answering(OK))
    try:
        answer = await post(
            client, server.url("/hook?x=1"), headers={"User-Agent": "t/1", "webhook-id": "dlv_1"}
        )
    finally:
        await server.__aexit__()

    assert (answer.status, answer.reason, answer.body_bytes, answer.truncated) == (
        200,
        "OK",
        2,
        False,
    )
    [request] = server.requests
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /hook?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Content-Length: 7" in lines and b"User-Agent: t/1" in lines
    assert b"webhook-id: dlv_1" in lines and body == b'{"a":1}'


async def test_header_values_with_line_breaks_are_refused(client: HttpClient) -> None:
    with pytest.raises(PermanentDeliveryError, match="line break"):
        await post(client, "http://127.0.0.1:9/x", headers={"X": "a\r\nInjected: 1"})


async def test_keep_alive_reuses_one_connection_for_sequential_posts(client: HttpClient) -> None:
    server = await serving(answering(OK))
    try:
        for _ in range(5):
            assert (await post(client, server.url())).status == 200
    finally:
        await server.__aexit__()

    assert (server.connections, len(server.requests)) == (1, 5)


async def test_the_pool_never_opens_more_than_its_size(loopback: None) -> None:
    busy = 0
    most = 0

    async def slow(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal busy, most
        while await server.read_request(reader) is not None:
            busy += 1
            most = max(most, busy)
            await asyncio.sleep(0.05)
            busy -= 1
            writer.write(OK)
            await writer.drain()

    server = await serving(slow)
    small = HttpClient(pool_size=2)
    try:
        answers = await asyncio.gather(*(post(small, server.url()) for _ in range(8)))
    finally:
        await small.aclose()
        await server.__aexit__()

    assert [a.status for a in answers] == [200] * 8
    assert server.connections == 2 and most == 2


async def test_a_full_pool_closes_an_idle_connection_to_reach_another_host(
    loopback: None,
) -> None:
    servers = [await serving(answering(OK)) for _ in range(3)]
    small = HttpClient(pool_size=2)
    try:
        for server in [*servers, servers[0]]:
            assert (await post(small, server.url(), deadline=3.0)).status == 200
    finally:
        await small.aclose()
        for server in servers:
            await server.__aexit__()

    # The first host's idle connection made room for the third, then was dialled anew.
    assert [s.connections for s in servers] == [2, 1, 1]


async def test_connection_close_in_the_answer_is_not_reused(client: HttpClient) -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    server = await serving(answering(closing, then_close=True))
    try:
        for _ in range(3):
            assert (await post(client, server.url())).status == 200
    finally:
        await server.__aexit__()

    assert server.connections == 3


async def test_an_idle_socket_the_server_closed_is_dropped_not_reused(client: HttpClient) -> None:
    """The server answers, then closes the idle connection; the next POST dials anew."""
    server = await serving(answering(OK, then_close=True))
    try:
        assert (await post(client, server.url())).status == 200
        await asyncio.sleep(0.2)  # the FIN arrives while the connection is idle
        assert (await post(client, server.url())).status == 200
    finally:
        await server.__aexit__()

    assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_close_racing_a_reused_request_is_retried_once_on_a_fresh_connection(
    client: HttpClient,
) -> None:
    """The second request on each connection meets a close with no answer byte: what
    a server closing an idle keep-alive socket looks like from the client."""

    async def one_then_hang_up(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)  # read, never answered: closed instead

    server = await serving(one_then_hang_up)
    try:
        assert (await post(client, server.url())).status == 200
        assert (await post(client, server.url())).status == 200
    finally:
        await server.__aexit__()

    # Request 2 went out twice: on the reused connection, then on a fresh one.
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_a_close_on_a_fresh_connection_is_not_retried(client: HttpClient) -> None:
    async def hang_up(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)

    server = await serving(hang_up)
    try:
        with pytest.raises(TransientDeliveryError, match="connection lost: .*before answering"):
            await post(client, server.url())
    finally:
        await server.__aexit__()

    assert (server.connections, len(server.requests)) == (1, 1)


# -- bodies -------------------------------------------------------------------------------


async def test_a_chunked_answer_is_read_to_its_end_and_the_connection_reused(
    client: HttpClient,
) -> None:
    chunked = (
        b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
        b"5;ext=1\r\nhello\r\n"
        b"6\r\n world\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )

    async def dribble(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(reader) is not None:
            for i in range(0, len(chunked), 7):  # framing split across reads
                writer.write(chunked[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0.001)

    server = await serving(dribble)
    try:
        first = await post(client, server.url())
        second = await post(client, server.url())
    finally:
        await server.__aexit__()

    assert (first.status, first.body_bytes, first.headers["retry-after"]) == (503, 11, "7")
    assert second.status == 503
    assert server.connections == 1


async def test_a_close_delimited_answer_ends_at_eof(client: HttpClient) -> None:
    answer = b"HTTP/1.0 200 OK\r\n\r\nall of this is the body"
    server = await serving(answering(answer, then_close=True))
    try:
        first = await post(client, server.url())
        second = await post(client, server.url())
    finally:
        await server.__aexit__()

    assert (first.status, first.body_bytes, second.status) == (200, 23, 200)
    assert server.connections == 2


async def test_an_oversized_body_is_cut_at_the_cap_and_its_connection_closed(
    client: HttpClient,
) -> None:
    sent = 0

    async def huge(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal sent
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (50 * 2**20))
            chunk = b"x" * 65536
            while sent < 50 * 2**20:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)

    server = await serving(huge)
    try:
        started = time.monotonic()
        answer = await post(client, server.url(), max_body=1000)
        elapsed = time.monotonic() - started
        sent_then = sent
        second = await post(client, server.url(), max_body=1000)
    finally:
        await server.__aexit__()

    assert (answer.status, answer.truncated) == (200, True)
    assert 1000 < answer.body_bytes < 2**20
    assert elapsed < 5 and sent_then < 20 * 2**20
    assert second.status == 200 and server.connections == 2


async def test_a_garbled_status_line_is_a_transient_failure(client: HttpClient) -> None:
    server = await serving(answering(b"SMTP ready\r\n\r\n"))
    try:
        with pytest.raises(TransientDeliveryError, match="malformed HTTP answer"):
            await post(client, server.url())
    finally:
        await server.__aexit__()


# -- timeouts -------------------------------------------------------------------------


async def test_the_deadline_bounds_a_byte_dripping_server(client: HttpClient) -> None:
    async def drip(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        for byte in OK:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)  # well inside the read timeout, every time

    server = await serving(drip)
    try:
        started = time.monotonic()
        with pytest.raises(TransientDeliveryError, match="no complete answer within 1s"):
            await post(client, server.url(), read_timeout=0.5, deadline=1.0)
        elapsed = time.monotonic() - started
    finally:
        await server.__aexit__()

    assert 0.9 < elapsed < 2.0


async def test_the_read_timeout_ends_a_silent_server(client: HttpClient) -> None:
    async def silent(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    server = await serving(silent)
    try:
        started = time.monotonic()
        with pytest.raises(TransientDeliveryError, match="read timeout"):
            await post(client, server.url(), read_timeout=0.3, deadline=5.0)
        elapsed = time.monotonic() - started
    finally:
        await server.__aexit__()

    assert elapsed < 1.5


async def test_the_connect_timeout_ends_a_connect_nobody_accepts(client: HttpClient) -> None:
    """A listener whose accept queue is full: the SYN goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(TransientDeliveryError, match="connection failed: no connection within"):
            await post(client, f"http://127.0.0.1:{port}/", connect_timeout=0.5)
        elapsed = time.monotonic() - started
    finally:
        for filler in fillers:
            filler.close()
        listener.close()

    assert elapsed < 1.5


async def test_connection_refused_is_a_transient_connection_failure(client: HttpClient) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # bound once, never listening: refused
    with pytest.raises(TransientDeliveryError, match="connection failed"):
        await post(client, f"http://127.0.0.1:{port}/")


# -- https ------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_https_verifies_the_certificate_and_sends_sni(
    loopback: None, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    names: list[str | None] = []
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_context.sni_callback = sni  # type: ignore[assignment]

    async def handler(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(reader) is not None:
            writer.write(OK)
            await writer.drain()

    raw = await asyncio.start_server(
        lambda r, w: handler(tls, r, w), "127.0.0.1", 0, ssl=server_context
    )
    tls = Server(handler)
    url = f"https://localhost:{raw.sockets[0].getsockname()[1]}/hook"
    trusting = HttpClient(pool_size=2, ssl_context=ssl.create_default_context(cafile=str(cert)))
    default = HttpClient(pool_size=2)
    try:
        assert (await post(trusting, url)).status == 200
        assert (await post(trusting, url)).status == 200
        with pytest.raises(TransientDeliveryError, match="connection failed: TLS: .*verif"):
            await post(default, url)
    finally:
        await trusting.aclose()
        await default.aclose()
        raw.close()
        await raw.wait_closed()

    assert len(tls.requests) == 2 and names[:1] == ["localhost"]


# -- the SSRF guard at connect ------------------------------------------------------------


@pytest.fixture
async def no_connect(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record and refuse every connect; answer names from ``dns`` without a network."""
    seen: dict[str, Any] = {"connects": [], "dns": {}}
    loop = asyncio.get_running_loop()

    def refuse(self: socket.socket, address: object) -> None:
        seen["connects"].append(address)
        raise ConnectionRefusedError(f"test: no connecting to {address}")

    async def refuse_async(sock: socket.socket, address: object) -> None:
        seen["connects"].append(address)
        raise ConnectionRefusedError(f"test: no connecting to {address}")

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        addresses = seen["dns"].get(host)
        if addresses is None:
            raise socket.gaierror(f"test: no DNS for {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(loop, "sock_connect", refuse_async)
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture
def nothing_allowed() -> Iterator[None]:
    previous = get_settings()
    configure(previous, egress_allow_cidrs="")
    yield
    configure(previous)


async def test_a_name_resolving_only_to_blocked_addresses_is_refused_permanently(
    nothing_allowed: None, no_connect: dict[str, Any]
) -> None:
    no_connect["dns"]["rebind.test"] = ["10.0.0.5", "127.0.0.1"]
    client = HttpClient(pool_size=2)
    try:
        with pytest.raises(PermanentDeliveryError, match="refused to connect to rebind.test") as e:
            await post(client, "http://rebind.test/hook")
    finally:
        await client.aclose()

    assert "private" in str(e.value) and "loopback" in str(e.value)
    assert no_connect["connects"] == []


async def test_blocked_answers_are_dropped_and_only_allowed_ones_dialled(
    nothing_allowed: None, no_connect: dict[str, Any]
) -> None:
    no_connect["dns"]["mixed.test"] = ["10.0.0.5", "8.8.8.8", "169.254.169.254"]
    client = HttpClient(pool_size=2)
    try:
        with pytest.raises(TransientDeliveryError, match="connection failed"):
            await post(client, "http://mixed.test:81/hook")
    finally:
        await client.aclose()

    assert no_connect["connects"] == [("8.8.8.8", 81)]


async def test_the_address_dialled_is_checked_whatever_resolved_it(
    nothing_allowed: None, no_connect: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the DNS-side filter broken, the check at connect still refuses."""
    monkeypatch.setattr(http_client, "_allowed", lambda host, found: list(found))
    no_connect["dns"]["rebind.test"] = ["192.168.0.10"]
    client = HttpClient(pool_size=2)
    try:
        with pytest.raises(PermanentDeliveryError, match="refused to connect: .*private"):
            await post(client, "http://rebind.test/hook")
        with pytest.raises(PermanentDeliveryError, match="refused to connect"):
            await post(client, "http://[::ffff:10.0.0.1]/hook")
    finally:
        await client.aclose()

    assert no_connect["connects"] == []


async def test_the_allow_list_lets_a_blocked_range_through(
    loopback: None, no_connect: dict[str, Any]
) -> None:
    no_connect["dns"]["sink.test"] = ["127.0.0.1"]
    client = HttpClient(pool_size=2)
    try:
        with pytest.raises(TransientDeliveryError, match="connection failed"):
            await post(client, "http://sink.test:8080/hook")
    finally:
        await client.aclose()

    assert no_connect["connects"] == [("127.0.0.1", 8080)]


# -- the pool's life ----------------------------------------------------------------------


async def test_aclose_closes_idle_connections(loopback: None) -> None:
    closed = asyncio.Event()

    async def until_eof(
        server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(reader) is not None:
            writer.write(OK)
            await writer.drain()
        closed.set()

    server = await serving(until_eof)
    c = HttpClient(pool_size=2)
    try:
        assert (await post(c, server.url())).status == 200
        await c.aclose()
        await asyncio.wait_for(closed.wait(), 2)
        with pytest.raises(TransientDeliveryError, match="closed"):
            await post(c, server.url())
    finally:
        await server.__aexit__()


# -- URLs: the per-origin cache says what the full parse says ----------------------------

URLS = [
    "http://127.0.0.1:8080/hook",
    "http://127.0.0.1:8080/hook?a=1&b=2#frag",
    "http://127.0.0.1:8080?x=1",
    "http://127.0.0.1:8080#only-fragment",
    "http://127.0.0.1:8080",
    "https://example.com/a/b;c?d=e",
    "https://EXAMPLE.com:443/x",
    "http://[::1]:9000/v6",
    "http://[::ffff:10.0.0.1]/x",
    "http://user:pw@example.com/x",
    "http://example.com:0/x",
    "http://2130706433/x",
    "http://0x7f.0.0.1/x",
    "http://10.0.0.1/x",
    "ftp://example.com/x",
    "http:///nohost",
    "http://[::1/broken",
    "http://example.com/with space",
    "http://example.com/caf\u00e9",
    "http://b\u00fccher.example/x",
    "http://example.com/" + "x" * 2100,
    "http://example.com/a\r\nInjected: 1",
    "not a url",
]


@pytest.mark.parametrize("url", URLS)
def test_the_origin_cache_parses_every_url_as_the_full_parse_does(url: str) -> None:
    def outcome(parse: Callable[[str], tuple[object, bytes]]) -> object:
        try:
            return parse(url)
        except PermanentDeliveryError as exc:
            return str(exc)

    assert outcome(http_client._route) == outcome(http_client._parse.__wrapped__)


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("allow", ["", "127.0.0.0/8"])
def test_url_problems_with_the_origin_cache_match_the_full_check(url: str, allow: str) -> None:
    from channels_core.transports import http

    previous = get_settings()
    configure(previous, egress_allow_cidrs=allow)
    try:
        assert http._url_problem(url, allow) == http._full_url_problem.__wrapped__(url, allow)
    finally:
        configure(previous)
