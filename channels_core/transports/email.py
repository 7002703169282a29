"""Email egress over SMTP (aiosmtplib), one connection per batch.

Headers are built with ``email.message.EmailMessage``, which refuses CR/LF
in header values; we check them first anyway so the error names the field.
``Message-ID`` is derived from the delivery id, so a retried mail keeps its
identity and a receiver can deduplicate; ``In-Reply-To`` and ``References``
point at the Message-IDs this subscriber got for the thread's earlier
messages (the worker attaches their delivery ids).

SMTP 4xx answers are transient, 5xx permanent, per recipient.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING

import aiosmtplib

from channels_core.errors import ValidationError
from channels_core.settings import get_settings
from channels_core.transports.base import EgressTransport, TransportResult
from channels_core.validation import check_email, check_header_value

if TYPE_CHECKING:
    from channels_core.primitives import Channel, Message, Principal

__all__ = ["EmailEgress", "message_id_for"]


def _domain() -> str:
    sender = get_settings().smtp_from
    return sender.rpartition("@")[2] or "localhost"


def message_id_for(
    delivery_id: int | None, message_id: int | None, subscriber_id: int | None
) -> str:
    if delivery_id is not None:
        return f"<dlv-{delivery_id}@{_domain()}>"
    return f"<msg-{message_id}.{subscriber_id}@{_domain()}>"


def _classify(code: int) -> bool:
    """True when an SMTP reply code is permanent (5xx)."""
    return 500 <= code < 600


class EmailEgress(EgressTransport):
    """Send each subscriber an email at its ``email`` alias (or its email field)."""

    name = "email"

    def is_available(self) -> bool:
        return bool(get_settings().smtp_host)

    def build(self, message: Message, channel: Channel, subscriber: Principal) -> EmailMessage:
        settings = get_settings()
        address = subscriber.get_alias("email") or subscriber.email
        if not address:
            raise ValidationError(f"subscriber {subscriber.id} has no 'email' alias")
        check_email(address)
        subject = channel.get_alias("email_subject") or channel.title
        mail = EmailMessage()
        mail["From"] = check_header_value("From", settings.smtp_from)
        mail["To"] = address
        mail["Subject"] = check_header_value("Subject", subject)
        mail["Date"] = formatdate(localtime=False)
        mail["Message-ID"] = message_id_for(subscriber.delivery_id, message.id, subscriber.id)
        parents = [
            message_id_for(d, None, None) for d in getattr(subscriber, "thread_delivery_ids", [])
        ]
        if parents:
            mail["In-Reply-To"] = parents[-1]
            mail["References"] = " ".join(parents)
        mail["X-Channels-Message-Id"] = str(message.id)
        mail["X-Channels-Channel-Id"] = str(channel.id)
        subtype = "html" if message.content_type == "text/html" else "plain"
        mail.set_content(message.content or "", subtype=subtype)
        return mail

    async def send(
        self, message: Message, channel: Channel, subscribers: Sequence[Principal]
    ) -> list[TransportResult]:
        settings = get_settings()
        results: dict[int | None, TransportResult] = {}
        mails: list[tuple[Principal, EmailMessage]] = []
        for subscriber in subscribers:
            try:
                mails.append((subscriber, self.build(message, channel, subscriber)))
            except (ValidationError, ValueError) as exc:
                results[subscriber.id] = TransportResult.failed(
                    subscriber.id, str(exc), permanent=True
                )
        if mails:
            client = aiosmtplib.SMTP(
                hostname=settings.smtp_host,
                port=settings.smtp_port,
                timeout=settings.smtp_timeout,
                start_tls=settings.smtp_starttls,
                username=settings.smtp_username,
                password=settings.smtp_password,
            )
            try:
                await client.connect()
            except (aiosmtplib.SMTPException, OSError) as exc:
                error = f"SMTP connect to {settings.smtp_host}:{settings.smtp_port} failed: {exc}"
                permanent = isinstance(exc, aiosmtplib.SMTPResponseException) and _classify(
                    exc.code
                )
                for subscriber, _ in mails:
                    results[subscriber.id] = TransportResult.failed(
                        subscriber.id, error, permanent=permanent
                    )
                mails = []
            try:
                for index, (subscriber, mail) in enumerate(mails):
                    results[subscriber.id] = await self._send_one(client, subscriber, mail)
                    if not client.is_connected:
                        # The server hung up; the rest of the batch retries later.
                        for rest, _ in mails[index + 1 :]:
                            results[rest.id] = TransportResult.failed(
                                rest.id, "SMTP server closed the connection"
                            )
                        break
            finally:
                if client.is_connected:
                    try:
                        await client.quit()
                    except (aiosmtplib.SMTPException, OSError):
                        client.close()
        return [results[s.id] for s in subscribers]

    async def _send_one(
        self, client: aiosmtplib.SMTP, subscriber: Principal, mail: EmailMessage
    ) -> TransportResult:
        started = time.perf_counter()
        sid = subscriber.id
        try:
            refused, response = await client.send_message(mail)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            latency = (time.perf_counter() - started) * 1000
            first = exc.recipients[0] if exc.recipients else None
            code = first.code if first else 550
            return TransportResult.failed(
                sid,
                f"SMTP {code}: recipient refused: {first.message if first else exc}",
                permanent=_classify(code),
                status_code=code,
                latency_ms=latency,
            )
        except aiosmtplib.SMTPResponseException as exc:
            latency = (time.perf_counter() - started) * 1000
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.rset()
            return TransportResult.failed(
                sid,
                f"SMTP {exc.code}: {exc.message}",
                permanent=_classify(exc.code),
                status_code=exc.code,
                latency_ms=latency,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            latency = (time.perf_counter() - started) * 1000
            return TransportResult.failed(sid, f"SMTP error: {exc}", latency_ms=latency)
        latency = (time.perf_counter() - started) * 1000
        if refused:
            code = next(iter(refused.values())).code
            return TransportResult.failed(
                sid,
                f"SMTP {code}: recipient refused",
                permanent=_classify(code),
                status_code=code,
                latency_ms=latency,
            )
        return TransportResult.delivered(sid, status_code=250, latency_ms=latency)
