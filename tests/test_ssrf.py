"""The SSRF guard, table-driven: every non-public address is refused with an
empty allow-list, permanently, and nothing reaches a socket connect.

Every connect is intercepted (recorded and refused) before the guard is
even asked, so a broken guard still cannot send a packet off this host;
only the loopback redirect case uses real listeners.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from channels_cli.devservers import WebhookReceiver
from channels_core.primitives import Channel, Message, Principal
from channels_core.settings import Settings, configure, get_settings
from channels_core.transports.http import HttpEgress

BLOCKED = [
    # IPv4 ranges
    "http://127.0.0.1/",
    "http://127.1.2.3:8080/",
    "http://10.0.0.1/",
    "http://10.255.255.254/",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.0.1/",
    "http://0.0.0.0/",
    "http://0.1.2.3/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://192.0.0.1/",
    "http://192.0.2.1/",
    "http://198.51.100.1/",
    "http://203.0.113.1/",
    "http://198.18.0.1/",
    "http://198.19.255.254/",
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    # IPv6 ranges and IPv4 embedded in IPv6
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a00:1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:a00:1::1]/",
    "http://[2002:7f00:1::1]/",
    "http://[::127.0.0.1]/",
    # other spellings of IPv4 addresses
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.0.0.1/",
    "http://127.1/",
    "http://017700000001/",
    "http://167772161/",
    "http://0xa9fea9fe/",
    # hostnames that resolve to blocked addresses
    "http://localhost/",
    "http://LOCALHOST./",
    "https://internal.example/hook",
    "http://rebind.example/",
    # schemes other than http and https
    "ftp://example.com/file",
    "file:///etc/passwd",
    "gopher://127.0.0.1/",
]

# A local resolver for this test: these names answer with blocked addresses.
# "localhost" itself resolves through the real hosts file; its fully
# qualified spelling "localhost." is answered here, as a DNS server would.
FAKE_DNS = {
    "internal.example": "10.0.0.5",
    "rebind.example": "192.168.0.10",
    "localhost.": "127.0.0.1",
}


@pytest.fixture
def empty_allow_list() -> Iterator[None]:
    previous = get_settings()
    configure(previous, egress_allow_cidrs="", http_connect_timeout=2.0)
    yield
    configure(previous)


@pytest.fixture
async def intercepted(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record and refuse every connect; answer FAKE_DNS names without a network."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connecting to {address}")

    async def refuse_async(sock: socket.socket, address: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connecting to {address}")

    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        fake = FAKE_DNS.get(str(name).lower())
        if fake is not None:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (fake, port or 80))]
        if (
            name
            and any(c.isalpha() for c in str(name))
            and str(name).lower().rstrip(".") != "localhost"
        ):
            raise socket.gaierror(f"test: no DNS for {name}")
        return await real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(loop, "sock_connect", refuse_async)
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return attempts


def _subscriber(i: int, url: str) -> Principal:
    p = Principal("bot")
    p.aliases = {"endpoint": url}  # around the setter: the transport must refuse on its own
    p.id, p.delivery_id = i + 1, i + 1
    return p


async def test_every_blocked_address_is_refused_permanently_without_a_connect(
    empty_allow_list: None, intercepted: list[object]
) -> None:
    assert len(BLOCKED) >= 40
    message = Message("probe", author_id=1)
    message.id = 1
    channel = Channel("SSRF")
    channel.id = 1
    transport = HttpEgress()
    try:
        results = await transport.send(
            message, channel, [_subscriber(i, url) for i, url in enumerate(BLOCKED)]
        )
    finally:
        await transport.aclose()
    refused = {url: r for url, r in zip(BLOCKED, results, strict=True)}
    wrong = {url: r.errors for url, r in refused.items() if r.success or not r.permanent}
    assert wrong == {}, wrong
    assert intercepted == [], "a blocked address reached connect()"
    # Each says why: the range it falls in, the scheme, or the spelling.
    reasons = ("refused to connect", "must use http or https", "not a canonical IPv4")
    for url, result in refused.items():
        assert any(r in result.errors[0] for r in reasons), (url, result.errors)


async def test_a_redirect_to_a_second_loopback_server_is_not_followed() -> None:
    """Loopback allowed explicitly, as the tests and the embedded default do."""
    first, second = WebhookReceiver().start(), WebhookReceiver().start()
    previous = get_settings()
    configure(previous, egress_allow_cidrs="127.0.0.0/8")
    transport = HttpEgress()
    try:
        first.script("/hook", [(302, {"Location": second.url("/stolen")})])
        message = Message("probe", author_id=1)
        message.id = 1
        channel = Channel("SSRF")
        channel.id = 1
        [result] = await transport.send(message, channel, [_subscriber(0, first.url("/hook"))])
        assert (result.success, result.permanent, result.status_code) == (False, True, 302)
        assert "redirects are not followed" in result.errors[0]
        assert len(first.for_path("/hook")) == 1
        assert second.count() == 0
    finally:
        await transport.aclose()
        configure(previous)
        first.stop()
        second.stop()


def test_the_settings_default_allows_nothing() -> None:
    assert Settings.model_fields["egress_allow_cidrs"].default == ""
