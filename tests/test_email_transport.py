"""The email transport's sessions against a real aiosmtpd server on 127.0.0.1.

``tests/test_transports.py`` covers what a mail looks like and how single
refusals are classified; this file covers what the pooled, parallel,
pipelined sessions must keep: reuse across batches, several sessions per
large batch, a server hanging up mid-batch, 4xx/5xx per recipient with
and without PIPELINING, refused header injection, threading headers, and
QUIT on ``aclose()``. Each test gets its own server, so counts are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest

from channels_cli.devservers import SmtpReceiver
from channels_core.primitives import Channel, Message, Principal
from channels_core.settings import Settings, configure, get_settings
from channels_core.transports.base import TransportResult
from channels_core.transports.email import EmailEgress


class Receiver(SmtpReceiver):
    """``SmtpReceiver`` that counts sessions and QUITs, may offer PIPELINING,
    and hangs up during DATA for recipients named in ``drop``."""

    def __init__(self, pipelining: bool) -> None:
        super().__init__()
        self.pipelining = pipelining
        self.sessions: list[Any] = []
        self.quits = 0
        self.drop: set[str] = set()
        self.close_after: set[str] = set()
        self.peer_of: dict[str, Any] = {}
        self.stall: set[str] = set()
        self.smtputf8 = True

    async def handle_EHLO(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self._lock:
            self.sessions.append(session.peer)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if not self.smtputf8:
            responses = [r for r in responses if r != "250-SMTPUTF8"]
        return responses

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self._lock:
            self.quits += 1
        return "221 Bye"

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.stall:
            await asyncio.sleep(2)  # past the client's timeout
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.drop & set(envelope.rcpt_tos):
            server.transport.abort()  # hang up without answering
            return "451 never seen"
        status = await super().handle_DATA(server, session, envelope)
        with self._lock:
            self.peer_of.update(dict.fromkeys(envelope.rcpt_tos, session.peer))
        if self.close_after & set(envelope.rcpt_tos):
            # Answer, then hang up while the client holds the session idle.
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        return status

    def peers(self, recipients: list[str]) -> set[Any]:
        with self._lock:
            return {self.peer_of[r] for r in recipients if r in self.peer_of}

    def start(self) -> Receiver:
        super().start()
        return self


@pytest.fixture(params=[False, True], ids=["one-at-a-time", "pipelining"])
def smtp(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(pipelining=request.param).start()
    yield server
    server.stop()


@pytest.fixture
def tune(smtp: Receiver) -> Iterator[Callable[..., Settings]]:
    previous = get_settings()

    def apply(**values: Any) -> Settings:
        return configure(get_settings().model_copy(update=values))

    apply(
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_from="alerts@example.test",
        smtp_timeout=10,
        smtp_connections=4,
    )
    yield apply
    configure(previous)


@pytest.fixture
async def egress(tune: Callable[..., Settings]) -> AsyncIterator[EmailEgress]:
    transport = EmailEgress()
    yield transport
    await transport.aclose()


def addresses(n: int, prefix: str = "s") -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"{prefix}{i}-{tag}@example.com" for i in range(n)]


def subscribers(emails: list[str], first_delivery: int = 1000) -> list[Principal]:
    found = []
    for i, address in enumerate(emails):
        p = Principal("bot")
        p.aliases = {"email": address}  # set directly: some tests need values the setters refuse
        p.id, p.delivery_id = i + 1, first_delivery + i
        found.append(p)
    return found


def message(content: str = "hello", mid: int = 7) -> Message:
    m = Message(content, author_id=1)
    m.id = mid
    return m


def channel(title: str = "News", cid: int = 3) -> Channel:
    c = Channel(title)
    c.id = cid
    return c


def outcomes(results: list[TransportResult]) -> list[tuple[bool, bool, int | None]]:
    return [(r.success, r.permanent, r.status_code) for r in results]


def parsed(smtp: Receiver, address: str) -> Any:
    [mail] = smtp.to(address)
    return message_from_bytes(mail.data, policy=policy.default)


# -- sessions -------------------------------------------------------------------------


async def test_sessions_are_reused_across_batches_and_quit_on_aclose(
    smtp: Receiver, egress: EmailEgress
) -> None:
    emails = addresses(9)
    for start in range(0, 9, 3):
        results = await egress.send(message(), channel(), subscribers(emails[start : start + 3]))
        assert all(r.success for r in results)

    assert len(smtp.sessions) == 1  # three small batches, one SMTP session
    assert all(len(smtp.to(a)) == 1 for a in emails)
    await egress.aclose()
    await asyncio.sleep(0.05)
    assert smtp.quits == 1


async def test_a_large_batch_is_spread_over_parallel_sessions(
    smtp: Receiver, egress: EmailEgress
) -> None:
    emails = addresses(200)

    results = await egress.send(message(), channel(), subscribers(emails))

    assert all(r.success for r in results) and len(results) == 200
    assert len(smtp.sessions) == 4 and len(smtp.peers(emails)) == 4
    assert sorted(str(parsed(smtp, a)["Message-ID"]) for a in emails) == sorted(
        f"<dlv-{1000 + i}@example.test>" for i in range(200)
    )
    # The next batch takes the same four sessions from the pool.
    again = await egress.send(message(mid=8), channel(), subscribers(addresses(200)))
    assert all(r.success for r in again) and len(smtp.sessions) == 4


async def test_a_session_the_server_closed_while_idle_is_replaced(
    smtp: Receiver, egress: EmailEgress
) -> None:
    first, second = addresses(1), addresses(2)
    smtp.close_after.add(first[0])

    assert [r.success for r in await egress.send(message(), channel(), subscribers(first))] == [
        True
    ]
    await asyncio.sleep(0.2)  # the server hangs up on the idle session
    results = await egress.send(message(), channel(), subscribers(second))

    assert [r.success for r in results] == [True, True]
    assert len(smtp.sessions) == 2
    assert all(len(smtp.to(a)) == 1 for a in first + second)


async def test_a_pooled_session_found_dead_on_use_is_replaced_not_failed(
    smtp: Receiver, egress: EmailEgress
) -> None:
    first, second = addresses(1), addresses(3)
    await egress.send(message(), channel(), subscribers(first))
    [pooled] = egress._pools[asyncio.get_running_loop()].idle
    # Gone without the client having noticed yet (no connection_lost so far).
    pooled.transport.abort()

    results = await egress.send(message(), channel(), subscribers(second))

    assert [r.success for r in results] == [True, True, True], [r.errors for r in results]
    assert len(smtp.sessions) == 2
    assert all(len(smtp.to(a)) == 1 for a in first + second)


async def test_a_server_that_stops_answering_times_out_transiently(
    smtp: Receiver, egress: EmailEgress, tune: Callable[..., Settings]
) -> None:
    tune(smtp_timeout=0.5)
    emails = addresses(3)
    smtp.stall.add(emails[1])

    results = await egress.send(message(), channel(), subscribers(emails))

    assert [(r.success, r.permanent) for r in results] == [(True, False)] + [(False, False)] * 2
    assert all("did not answer within 0.5 s" in r.errors[0] for r in results[1:])
    assert [len(smtp.to(a)) for a in emails] == [1, 0, 0]


async def test_4xx_is_transient_and_5xx_permanent_per_recipient(
    smtp: Receiver, egress: EmailEgress
) -> None:
    emails = addresses(40)
    for index in range(0, 40, 5):
        smtp.refuse(emails[index], ["451 4.7.1 try again later"])
        smtp.refuse(emails[index + 1], ["550 5.1.1 no such user"])

    results = await egress.send(message(), channel(), subscribers(emails))

    for index, result in enumerate(results):
        if index % 5 == 0:
            assert outcomes([result]) == [(False, False, 451)]
            assert "451" in result.errors[0]
        elif index % 5 == 1:
            assert outcomes([result]) == [(False, True, 550)]
            assert "recipient refused" in result.errors[0]
        else:
            assert outcomes([result]) == [(True, False, 250)], result.errors
            assert len(smtp.to(emails[index])) == 1
    assert not any(smtp.to(emails[i]) for i in range(40) if i % 5 < 2)
    # A refused recipient leaves its session usable (RSET), so the pool kept them all.
    assert len(smtp.sessions) == 3


async def test_a_server_hanging_up_mid_batch_fails_only_the_unsent_rest(
    smtp: Receiver, egress: EmailEgress
) -> None:
    emails = addresses(6)
    smtp.refuse(emails[2], ["421 4.3.2 shutting down"])

    results = await egress.send(message(), channel(), subscribers(emails))

    assert outcomes(results[:3]) == [(True, False, 250), (True, False, 250), (False, False, 421)]
    for rest in results[3:]:
        assert (rest.success, rest.permanent) == (False, False)
        assert "closed the connection" in rest.errors[0]
    assert [len(smtp.to(a)) for a in emails] == [1, 1, 0, 0, 0, 0]


async def test_a_server_hanging_up_during_data_leaves_that_mail_and_the_rest_to_retry(
    smtp: Receiver, egress: EmailEgress
) -> None:
    emails = addresses(5)
    smtp.drop.add(emails[1])

    results = await egress.send(message(), channel(), subscribers(emails))

    assert outcomes(results[:1]) == [(True, False, 250)]
    for rest in results[1:]:
        assert (rest.success, rest.permanent) == (False, False)
        assert "closed the connection" in rest.errors[0]
    assert [len(smtp.to(a)) for a in emails] == [1, 0, 0, 0, 0]
    # The next batch gets a new session and goes through.
    smtp.drop.clear()
    again = await egress.send(message(), channel(), subscribers(emails[1:]))
    assert all(r.success for r in again)


async def test_a_server_that_floods_instead_of_answering_is_dropped(
    tune: Callable[..., Settings],
) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()
        writer.write(b"250-hi\r\n250 PIPELINING\r\n")
        await reader.readline()
        writer.write(b"2" * 100_000)  # a "reply" with no end
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    tune(smtp_port=server.sockets[0].getsockname()[1])
    egress = EmailEgress()
    try:
        results = await egress.send(message(), channel(), subscribers(addresses(2)))
    finally:
        await egress.aclose()
        server.close()
        await server.wait_closed()

    assert [(r.success, r.permanent) for r in results] == [(False, False)] * 2
    assert all("more than any reply holds" in r.errors[0] for r in results)


# -- what is written ------------------------------------------------------------------


async def test_header_injection_is_refused_and_nothing_is_sent(
    smtp: Receiver, egress: EmailEgress, tune: Callable[..., Settings]
) -> None:
    [ok] = addresses(1)
    by_alias = channel()
    by_alias.aliases = {"email_subject": "Hi\r\nBcc: victim@example.com"}

    [subject] = await egress.send(message(), by_alias, subscribers([ok]))
    [address] = await egress.send(
        message(), channel(), subscribers([f"{ok}\nBcc: victim@example.com"])
    )
    [nul] = await egress.send(message(), channel(), subscribers([f"a\x00{ok}"]))
    tune(smtp_from="alerts@example.test\r\nBcc: victim@example.com")
    [sender] = await egress.send(message(), channel(), subscribers([ok]))

    assert "Subject" in subject.errors[0] and "From" in sender.errors[0]
    assert "control character" in nul.errors[0]
    for result in (subject, address, sender, nul):
        assert (result.success, result.permanent) == (False, True)
    assert smtp.count() == 0 and smtp.sessions == []


async def test_threading_headers_and_a_long_thread_folded(
    smtp: Receiver, egress: EmailEgress
) -> None:
    short, long = addresses(2)
    replying, deep = subscribers([short, long])
    replying.thread_delivery_ids = [11, 12]  # type: ignore[attr-defined]
    deep.thread_delivery_ids = list(range(1, 61))  # type: ignore[attr-defined]

    results = await egress.send(message(), channel(), [replying, deep])

    assert all(r.success for r in results)
    mail = parsed(smtp, short)
    assert mail["In-Reply-To"] == "<dlv-12@example.test>"
    assert mail["References"] == "<dlv-11@example.test> <dlv-12@example.test>"
    raw = smtp.to(long)[0].data
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert parsed(smtp, long)["References"].split() == [
        f"<dlv-{i}@example.test>" for i in range(1, 61)
    ]


async def test_an_internationalised_address_needs_a_server_offering_smtputf8(
    smtp: Receiver, egress: EmailEgress
) -> None:
    plain, utf8 = (
        f"plain-{uuid.uuid4().hex[:8]}@example.com",
        f"jösé-{uuid.uuid4().hex[:8]}@example.com",
    )

    delivered = await egress.send(message(), channel(), subscribers([plain, utf8]))
    await egress.aclose()
    smtp.smtputf8 = False
    refused = await egress.send(message(), channel(), subscribers([plain, utf8]))

    assert [r.success for r in delivered] == [True, True]
    assert parsed(smtp, utf8)["To"] == utf8 and smtp.to(utf8)[0].rcpt_tos == [utf8]
    assert [(r.success, r.permanent) for r in refused] == [(True, False), (False, True)]
    assert "SMTPUTF8" in refused[1].errors[0]
    assert len(smtp.to(plain)) == 2 and len(smtp.to(utf8)) == 1


async def test_body_dots_and_non_ascii_round_trip(smtp: Receiver, egress: EmailEgress) -> None:
    [to] = addresses(1)
    content = ".leading dot\n..two\n.\nGrüße, 你好\n" + "x" * 2000

    [result] = await egress.send(message(content), channel("Grüße"), subscribers([to]))

    assert result.success
    mail = parsed(smtp, to)
    assert mail["Subject"] == "Grüße" and mail["To"] == to
    assert mail["From"] == "alerts@example.test" and mail["X-Channels-Channel-Id"] == "3"
    assert mail.get_content().replace("\r\n", "\n").rstrip("\n") == content


# -- STARTTLS and AUTH: aiosmtplib opens the session, this transport drives it ---------


class TlsReceiver(Receiver):
    """Offers STARTTLS, requires it and AUTH before MAIL."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(pipelining=True)
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.logins: list[bytes] = []

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult

        ok = (data.login, data.password) == (b"mailer", b"s3cret")
        if ok:
            with self._lock:
                self.logins.append(data.login)
        return AuthResult(success=ok)

    def start(self) -> TlsReceiver:
        from aiosmtpd.controller import Controller

        self._controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            tls_context=self.tls,
            require_starttls=True,
            authenticator=self.authenticate,
            auth_required=True,
        )
        self._controller.start()
        return self


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_starttls_and_auth_sessions_are_pooled_and_pipelined(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate
    server = TlsReceiver(cert, key).start()
    previous = get_settings()
    configure(
        previous.model_copy(
            update={
                "smtp_host": "127.0.0.1",
                "smtp_port": server.port,
                "smtp_from": "alerts@example.test",
                "smtp_starttls": True,
                "smtp_username": "mailer",
                "smtp_password": "s3cret",
                "smtp_timeout": 10,
            }
        )
    )
    egress = EmailEgress()
    try:
        emails = addresses(40)
        server.refuse(emails[3], ["550 5.1.1 no such user"])
        first = await egress.send(message(), channel(), subscribers(emails[:20]))
        second = await egress.send(message(), channel(), subscribers(emails[20:]))
        [pooled, *_] = egress._pools[asyncio.get_running_loop()].idle
        assert pooled.pipelining and pooled.transport.get_extra_info("sslcontext") is not None
    finally:
        await egress.aclose()
        configure(previous)
        server.stop()

    results = first + second
    assert [r.success for r in results] == [i != 3 for i in range(40)]
    assert results[3].permanent and results[3].status_code == 550
    assert all(len(server.to(a)) == (i != 3) for i, a in enumerate(emails))
    # Two sessions (EHLO before and after STARTTLS each), reused, each logged in once.
    assert len(set(server.sessions)) == len(server.logins) == 2


async def test_a_send_cancelled_mid_conversation_never_leaks_into_the_next_batch() -> None:
    """A session cancelled while replies are owed is dropped, not pooled: the
    next batch must not read the old replies as its own (its mail would be
    stored for the cancelled recipient and reported delivered)."""
    stored: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow\r\n")
        rcpt, body, in_data = b"", [], False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    stored.append((rcpt, b"".join(body)))
                    body = []
                    writer.write(b"250 queued\r\n")
                else:
                    body.append(line)
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-slow\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                await asyncio.sleep(0.3)  # the first batch is cancelled while waiting here
                writer.write(b"250 ok\r\n")
            elif verb == b"RCPT":
                rcpt = line.strip()
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    previous = get_settings()
    configure(
        previous.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_timeout": 5})
    )
    egress = EmailEgress()
    try:
        [first, second] = addresses(2)
        pending = asyncio.ensure_future(
            egress.send(message("for the first"), channel(), subscribers([first]))
        )
        await asyncio.sleep(0.1)
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        results = await egress.send(
            message("for the second"), channel(), subscribers([second], 2000)
        )
        await asyncio.sleep(0.5)  # let the first session's late replies arrive
        for rcpt, body in stored:
            assert b"RCPT TO" not in body  # no command ever became mail content
            assert (b"for the second" in body) == (second.encode() in rcpt)
        if results[0].success:
            assert any(second.encode() in rcpt for rcpt, _ in stored)
    finally:
        await egress.aclose()
        configure(previous)
        server.close()
        await server.wait_closed()
