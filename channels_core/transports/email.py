"""Email egress over SMTP: pooled connections, several at once, pipelined.

Each message's common part (From, Subject, Date, the ``X-Channels-*``
headers, the MIME headers and the encoded body) is built once per send with
``email.message.EmailMessage``; per subscriber only ``To``, ``Message-ID``
and the threading headers are written, as bytes, in front of it. CR/LF in
any header value is refused (the error names the field) and every address
passes ``check_email``; one outside ASCII goes out with SMTPUTF8, to a
server that offers it, and is refused permanently by one that does not.
``Message-ID`` is derived from the delivery id, so a
retried mail keeps its identity and a receiver can deduplicate;
``In-Reply-To`` and ``References`` point at the Message-IDs this subscriber
got for the thread's earlier messages (the worker attaches their delivery
ids).

A batch is spread over up to ``smtp_connections`` SMTP sessions that take
mails from one queue. Sessions are opened by aiosmtplib (connect, EHLO,
STARTTLS, AUTH: the parts worth a tested library) and then driven here, so
a server that offers ESMTP PIPELINING (RFC 2920) gets one round trip per
mail: the end of one mail's content, then the next mail's MAIL, RCPT and
DATA. A server without it gets one command at a time. Idle sessions are kept
per event loop for the next batch (at most ``smtp_connections``, for at most
``smtp_pool_idle`` seconds), dropped on any error or when the server hangs
up, and QUIT by ``aclose()``; an incomplete transaction is RSET before the
session's next mail.

SMTP 4xx answers are transient, 5xx permanent, per recipient. A server that
hangs up (or answers 421) fails only the mail in hand and, if no other
session is left, the unsent rest: transiently, to be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import TYPE_CHECKING, cast

import aiosmtplib

from channels_core.errors import ValidationError
from channels_core.settings import Settings, get_settings
from channels_core.transports.base import EgressTransport, TransportResult
from channels_core.validation import check_email, check_header_value

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["EmailEgress", "message_id_for"]

# Below this many mails per session a batch uses fewer sessions: a small
# batch gains nothing from being split, and keeps the order it was given.
_MIN_MAILS_PER_SESSION = 16
# RFC 5322's recommended line length; longer References lines are folded.
_FOLD_AT = 78
_PERIOD_AT_LINE_START = re.compile(rb"(?m)^\.")
_BARE_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CLOSED = "SMTP server closed the connection"
# Bounds on what a server may send that nobody asked for (aiosmtplib allows
# 32 KiB per reply); a pipelined batch awaits at most four replies at once.
_MAX_REPLY_BYTES = 32 * 1024
_MAX_REPLIES = 64


def _sender(smtp_from: str) -> str:
    """The envelope sender: the address in ``smtp_from`` (which may carry a display name)."""
    return parseaddr(smtp_from)[1] or smtp_from


def _domain() -> str:
    return _sender(get_settings().smtp_from).rpartition("@")[2] or "localhost"


def message_id_for(
    delivery_id: int | None, message_id: int | None, subscriber_id: int | None
) -> str:
    if delivery_id is not None:
        return f"<dlv-{delivery_id}@{_domain()}>"
    return f"<msg-{message_id}.{subscriber_id}@{_domain()}>"


def _classify(code: int) -> bool:
    """True when an SMTP reply code is permanent (5xx)."""
    return 500 <= code < 600


def _fold(name: str, values: list[str]) -> bytes:
    """``Name: v1 v2 ...`` folded at whitespace so no line passes 78 characters."""
    lines: list[str] = []
    line = f"{name}:"
    for value in values:
        if len(line) + 1 + len(value) > _FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = ""
        line += f" {value}"
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


@dataclass(slots=True)
class _Common:
    """The part of a message's mail that every subscriber shares."""

    sender: bytes
    domain: str
    # Headers, blank line and body, CRLF line endings, dot-stuffed, ending
    # with the ``.`` line that closes DATA.
    tail: bytes


@dataclass(slots=True)
class _Mail:
    subscriber_id: int | None
    recipient: bytes
    data: bytes
    # An internationalised address: sent only where the server offers SMTPUTF8.
    utf8: bool = False
    started: float = 0.0


def _common(message: Message, channel: Channel, settings: Settings) -> _Common:
    subject = channel.get_alias("email_subject") or channel.title
    mail = EmailMessage()
    mail["From"] = check_header_value("From", settings.smtp_from)
    mail["Subject"] = check_header_value("Subject", subject)
    mail["Date"] = formatdate(localtime=False)
    mail["X-Channels-Message-Id"] = str(message.id)
    mail["X-Channels-Channel-Id"] = str(channel.id)
    subtype = "html" if message.content_type == "text/html" else "plain"
    mail.set_content(message.content or "", subtype=subtype)
    raw = _BARE_LINE_ENDING.sub(b"\r\n", mail.as_bytes(policy=policy.SMTP))
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    sender = _sender(settings.smtp_from)
    if not sender.isascii():
        raise ValidationError(f"smtp_from {sender!r} is not ASCII; SMTPUTF8 is not supported")
    return _Common(
        sender=sender.encode("ascii"),
        domain=sender.rpartition("@")[2] or "localhost",
        tail=_PERIOD_AT_LINE_START.sub(b"..", raw) + b".\r\n",
    )


def _mail_for(message: Message, common: _Common, subscriber: Principal) -> _Mail:
    address = subscriber.get_alias("email") or subscriber.email
    if not address:
        raise ValidationError(f"subscriber {subscriber.id} has no 'email' alias")
    check_email(address)
    if _CONTROL.search(address):
        # It goes into an SMTP command line as well as a header.
        raise ValidationError(f"email {address!r} contains a control character")
    domain = common.domain
    delivery_id = subscriber.delivery_id
    if delivery_id is not None:
        own = f"<dlv-{delivery_id}@{domain}>"
    else:
        own = f"<msg-{message.id}.{subscriber.id}@{domain}>"
    head = f"To: {address}\r\nMessage-ID: {own}\r\n".encode()
    parents = [f"<dlv-{d}@{domain}>" for d in getattr(subscriber, "thread_delivery_ids", [])]
    if parents:
        head += f"In-Reply-To: {parents[-1]}\r\n".encode("ascii") + _fold("References", parents)
    return _Mail(subscriber.id, address.encode(), head + common.tail, not address.isascii())


class _Session(asyncio.Protocol):
    """One SMTP connection after its greeting, EHLO, STARTTLS and AUTH.

    ``exchange`` writes commands and waits for that many replies; replies
    to commands written earlier and not yet awaited come first, in order.
    """

    def __init__(self, transport: asyncio.Transport, pipelining: bool, smtputf8: bool) -> None:
        self.transport = transport
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.closed = False
        # Why the session ended, for the mails it could not send.
        self.reason = _CLOSED
        self.needs_rset = False
        self.last_used = time.monotonic()
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._pending = b""

    # -- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _MAX_REPLY_BYTES or len(self._replies) > _MAX_REPLIES:
            # Not an SMTP server, or a broken one: nothing it says can be trusted.
            self.reason = "SMTP server sent more than any reply holds"
            self._buffer.clear()
            self.transport.abort()
            self.closed = True
            self._wake(force=True)
            return
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if line[3:4] == b"-":
                continue  # a continuation line; the last line carries the reply
            try:
                code = int(line[:3])
            except ValueError:
                code = 0  # a malformed reply: neither success nor a known failure
            self._replies.append((code, line[4:].decode("utf-8", "replace").strip()))
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(force=True)

    def _wake(self, force: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (force or len(self._replies) >= self._want):
            waiter.set_result(None)

    # -- commands

    def defer(self, data: bytes) -> None:
        """Send ``data`` with the next exchange: one write, not two, per pipelined mail."""
        self._pending = data

    async def exchange(self, data: bytes, count: int, timeout: float) -> list[tuple[int, str]]:
        """Send ``data``; return the next ``count`` replies (fewer if the server hung up)."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        if data and not self.closed:
            self.transport.write(data)
        if len(self._replies) < count and not self.closed:
            loop = asyncio.get_running_loop()
            self._want = count
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, self._time_out, timeout)
            try:
                await waiter
            except BaseException:
                # Cancelled with replies still owed: the server may be mid-mail, and a
                # later batch would read those replies as its own. Never reuse it.
                self.reason = "interrupted while waiting for the SMTP server"
                self.closed = True
                self.transport.abort()
                raise
            finally:
                timer.cancel()
                self._waiter = None
        take = min(count, len(self._replies))
        return [self._replies.popleft() for _ in range(take)]

    def _time_out(self, timeout: float) -> None:
        # A server that stops answering leaves the session in an unknown state: drop it.
        self.reason = f"SMTP server did not answer within {timeout:g} s"
        self.closed = True
        self.transport.abort()  # close() would wait to flush to a server that is not reading
        self._wake(force=True)

    @property
    def busy(self) -> bool:
        """Replies or data still owed: a session in that state must not be reused."""
        return bool(self._replies or self._pending or self._buffer)

    def close(self) -> None:
        self.closed = True
        self.transport.close()

    async def quit(self, timeout: float) -> None:
        if not self.closed:
            with contextlib.suppress(OSError, RuntimeError):
                await self.exchange(b"QUIT\r\n", 1, timeout)
        self.close()


@dataclass
class _Pool:
    key: tuple[object, ...]
    idle: list[_Session]


def _close_pools(pools: dict[asyncio.AbstractEventLoop, _Pool]) -> None:
    """Close every pooled connection without QUIT (a collected transport, or exit)."""
    for pool in pools.values():
        for session in pool.idle:
            with contextlib.suppress(Exception):  # the loop may be closed already
                session.close()
        pool.idle.clear()
    pools.clear()


class EmailEgress(EgressTransport):
    """Send each subscriber an email at its ``email`` alias (or its email field)."""

    name = "email"

    def __init__(self) -> None:
        self._pools: dict[asyncio.AbstractEventLoop, _Pool] = {}
        # An instance dropped without aclose() (a test, a short script) still
        # closes its sockets instead of leaving them to the garbage collector.
        weakref.finalize(self, _close_pools, self._pools)

    def is_available(self) -> bool:
        return bool(get_settings().smtp_host)

    def build(self, message: Message, channel: Channel, subscriber: Principal) -> EmailMessage:
        """The mail ``subscriber`` would get, parsed back from the bytes ``send`` writes."""
        data = _mail_for(message, _common(message, channel, get_settings()), subscriber).data
        raw = data[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
        parsed = message_from_bytes(raw, _class=EmailMessage, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    async def aclose(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            timeout = min(get_settings().smtp_timeout, 5.0)
            sessions, pool.idle = pool.idle, []
            await asyncio.gather(*(s.quit(timeout) for s in sessions))

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        settings = get_settings()
        results: dict[int | None, TransportResult] = {}
        mails: deque[_Mail] = deque()
        try:
            common: _Common | None = _common(message, channel, settings)
        except (ValidationError, ValueError) as exc:
            common = None
            for subscriber in subscribers:
                results[subscriber.id] = TransportResult.failed(
                    subscriber.id, str(exc), permanent=True
                )
        if common is not None:
            for subscriber in subscribers:
                try:
                    mails.append(_mail_for(message, common, subscriber))
                except (ValidationError, ValueError) as exc:
                    results[subscriber.id] = TransportResult.failed(
                        subscriber.id, str(exc), permanent=True
                    )
        if mails:
            assert common is not None
            await self._deliver(settings, common, mails, results)
        return [results[s.id] for s in subscribers]

    # -- sessions

    def _pool(self, settings: Settings) -> _Pool:
        key = (
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_starttls,
            settings.smtp_username,
            settings.smtp_password,
        )
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None or pool.key != key:
            if pool is not None:  # the settings changed: the old server's sessions go
                for session in pool.idle:
                    session.close()
            pool = self._pools[loop] = _Pool(key, [])
        return pool

    def _checkout(self, pool: _Pool, settings: Settings) -> _Session | None:
        now = time.monotonic()
        while pool.idle:
            session = pool.idle.pop()
            # A busy idle session heard something unasked (a 421 before hanging up).
            if (
                not session.closed
                and not session.busy
                and now - session.last_used < settings.smtp_pool_idle
            ):
                return session
            session.close()
        return None

    def _checkin(self, pool: _Pool, session: _Session, settings: Settings) -> None:
        if session.closed or session.busy or len(pool.idle) >= settings.smtp_connections:
            session.close()
            return
        session.last_used = time.monotonic()
        pool.idle.append(session)

    async def _open(self, settings: Settings) -> _Session:
        client = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            timeout=settings.smtp_timeout,
            start_tls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=settings.smtp_password,
        )
        await client.connect()
        try:
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
            # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
            transport = cast("asyncio.Transport | None", client.transport)
            if transport is None or transport.is_closing():
                raise aiosmtplib.SMTPServerDisconnected("connection lost after EHLO")
        except BaseException:
            client.close()
            raise
        # From here on the session is ours: aiosmtplib answers one command at a time.
        session = _Session(
            transport,
            client.supports_extension("pipelining"),
            client.supports_extension("smtputf8"),
        )
        transport.set_protocol(session)
        return session

    async def _deliver(
        self,
        settings: Settings,
        common: _Common,
        mails: deque[_Mail],
        results: dict[int | None, TransportResult],
    ) -> None:
        pool = self._pool(settings)
        everyone = list(mails)
        wanted = max(1, min(settings.smtp_connections, -(-len(mails) // _MIN_MAILS_PER_SESSION)))
        reused: list[_Session] = []
        while len(reused) < wanted and (session := self._checkout(pool, settings)) is not None:
            reused.append(session)
        opened: list[_Session] = []
        errors: list[Exception] = []
        try:
            for outcome in await asyncio.gather(
                *(self._open(settings) for _ in range(wanted - len(reused))),
                return_exceptions=True,
            ):
                if isinstance(outcome, _Session):
                    opened.append(outcome)
                elif isinstance(outcome, Exception):
                    errors.append(outcome)
                else:
                    raise outcome
        except BaseException:
            for session in reused + opened:
                session.close()
            raise
        if not reused and not opened:
            exc = errors[0]
            error = f"SMTP connect to {settings.smtp_host}:{settings.smtp_port} failed: {exc}"
            permanent = isinstance(exc, aiosmtplib.SMTPResponseException) and _classify(exc.code)
            code = exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) else None
            for mail in mails:
                results[mail.subscriber_id] = TransportResult.failed(
                    mail.subscriber_id, error, permanent=permanent, status_code=code
                )
            return
        ended: list[str] = []
        work = [
            self._work(pool, s, s in reused, settings, common, mails, results, ended)
            for s in reused + opened
        ]
        failures = [
            exc
            for exc in await asyncio.gather(*work, return_exceptions=True)
            if isinstance(exc, BaseException)
        ]
        # Whatever no session could send (every session hung up), and, after
        # an unexpected error, whatever it left without an outcome: retried.
        reason = ended[-1] if ended else _CLOSED
        if failures:
            reason = f"SMTP error: {failures[0]!r}"
        for mail in everyone:
            if mail.subscriber_id not in results:
                results[mail.subscriber_id] = TransportResult.failed(mail.subscriber_id, reason)
        mails.clear()
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure  # cancellation and the like are not a mail's outcome

    async def _work(
        self,
        pool: _Pool,
        session: _Session,
        reused: bool,
        settings: Settings,
        common: _Common,
        mails: deque[_Mail],
        results: dict[int | None, TransportResult],
        ended: list[str],
    ) -> None:
        """Send mails from the shared queue over ``session`` until none is left or it ends."""
        timeout = settings.smtp_timeout
        owed: _Mail | None = None  # content written, its reply not read yet (pipelining)
        unproven = reused  # a pooled session not yet heard from may have died while idle
        try:
            while mails:
                if session.closed:
                    if not unproven:
                        break
                    # The pooled session had died while idle; nothing was sent on it.
                    unproven = False
                    try:
                        session = await self._open(settings)
                    except (aiosmtplib.SMTPException, OSError):
                        return
                mail = mails.popleft()
                mail.started = time.perf_counter()
                if mail.utf8 and not session.smtputf8:
                    results[mail.subscriber_id] = TransportResult.failed(
                        mail.subscriber_id,
                        f"SMTP server does not offer SMTPUTF8, which {mail.recipient.decode()!r}"
                        " needs",
                        permanent=True,
                    )
                    continue
                envelope = [
                    b"MAIL FROM:<" + common.sender + (b"> SMTPUTF8\r\n" if mail.utf8 else b">\r\n"),
                    b"RCPT TO:<" + mail.recipient + b">\r\n",
                    b"DATA\r\n",
                ]
                rset = session.needs_rset
                if rset:
                    envelope.insert(0, b"RSET\r\n")
                if session.pipelining:
                    replies = await session.exchange(
                        b"".join(envelope), len(envelope) + (owed is not None), timeout
                    )
                    if owed is not None:
                        if replies:
                            self._record_data_reply(owed, replies.pop(0), session, results)
                        else:
                            self._lost(owed, session, results)
                        owed = None
                else:
                    replies = []
                    for command in envelope:
                        reply = await session.exchange(command, 1, timeout)
                        replies += reply
                        if not reply or not (200 <= reply[0][0] < 400):
                            break
                if rset and replies:
                    code, _ = replies.pop(0)
                    if code != 250:
                        session.close()  # a session that cannot reset is of no further use
                        replies = []
                    session.needs_rset = False
                if not replies and session.closed:
                    # Nothing of this mail reached the server: it goes back to the queue.
                    mails.appendleft(mail)
                    continue
                unproven = False
                failure = self._envelope_outcome(mail, replies, session.reason)
                if failure is not None:
                    results[mail.subscriber_id] = failure
                    session.needs_rset = True
                    if len(replies) == 3 and replies[2][0] == 354:
                        # DATA accepted though the envelope was not: an empty
                        # message ends the transaction (the server rejects it).
                        await session.exchange(b".\r\n", 1, timeout)
                    if any(code == 421 for code, _ in replies):
                        session.close()  # 421: the server is closing the session
                    continue
                session.defer(mail.data)
                if session.pipelining:
                    owed = mail
                    continue
                reply = await session.exchange(b"", 1, timeout)
                if reply:
                    self._record_data_reply(mail, reply[0], session, results)
                else:
                    self._lost(mail, session, results)
            if owed is not None:
                reply = await session.exchange(b"", 1, timeout)
                if reply:
                    self._record_data_reply(owed, reply[0], session, results)
                else:
                    self._lost(owed, session, results)
                owed = None
        finally:
            if owed is not None:  # cancelled while waiting: the mail's fate is unknown
                self._lost(owed, session, results)
                session.close()
            if session.closed:
                ended.append(session.reason)
            self._checkin(pool, session, settings)

    @staticmethod
    def _lost(mail: _Mail, session: _Session, results: dict[int | None, TransportResult]) -> None:
        """The session ended after the mail's content: the server may or may not have it."""
        results[mail.subscriber_id] = TransportResult.failed(
            mail.subscriber_id,
            f"{session.reason} before confirming the mail",
            latency_ms=(time.perf_counter() - mail.started) * 1000,
        )

    @staticmethod
    def _envelope_outcome(
        mail: _Mail, replies: list[tuple[int, str]], ended: str
    ) -> TransportResult | None:
        """None when MAIL, RCPT and DATA were accepted; else this mail's failure."""
        latency = (time.perf_counter() - mail.started) * 1000
        sid = mail.subscriber_id
        for step, (code, text) in zip(("MAIL", "RCPT", "DATA"), replies, strict=False):
            ok = code == 354 if step == "DATA" else 200 <= code < 300
            if ok:
                continue
            if step == "RCPT":
                error = f"SMTP {code}: recipient refused: {text}"
            else:
                error = f"SMTP {code}: {step} refused: {text}"
            return TransportResult.failed(
                sid, error, permanent=_classify(code), status_code=code, latency_ms=latency
            )
        if len(replies) < 3:
            return TransportResult.failed(sid, ended, latency_ms=latency)
        return None

    @staticmethod
    def _record_data_reply(
        mail: _Mail,
        reply: tuple[int, str],
        session: _Session,
        results: dict[int | None, TransportResult],
    ) -> None:
        code, text = reply
        latency = (time.perf_counter() - mail.started) * 1000
        sid = mail.subscriber_id
        if 200 <= code < 300:
            results[sid] = TransportResult.delivered(sid, status_code=code, latency_ms=latency)
            return
        results[sid] = TransportResult.failed(
            sid,
            f"SMTP {code}: {text}",
            permanent=_classify(code),
            status_code=code,
            latency_ms=latency,
        )
        if code == 421:
            session.close()
