"""Local receivers for development and tests: webhook, SMTP and queue.

Real servers on 127.0.0.1 that record what they receive, so ``make run`` and
the end-to-end tests can show what a subscriber saw:

- ``WebhookReceiver``: an aiohttp server; answers from a per-path script
  (``receiver.script("/hook/1", [500, 500, 200])``) and verifies Standard
  Webhooks signatures when it knows the secret.
- ``SmtpReceiver``: aiosmtpd; refuses scripted recipients with 4xx or 5xx.
- ``QueueConsumer``: a plain kombu consumer on named queues.

Each runs on its own thread, so sync and async callers use it alike.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message as EmailMessage
from typing import Any

__all__ = ["WebhookReceiver", "Received", "SmtpReceiver", "Mail", "QueueConsumer", "free_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """An HTTP server recording every POST; scripted statuses per path."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.secrets: dict[str, str] = {}
        self._scripts: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def script(self, path: str, answers: Iterable[int | tuple[int, dict[str, str]]]) -> None:
        """Answer the next requests to ``path`` with these statuses, then 200."""
        with self._lock:
            self._scripts[path] = [a if isinstance(a, tuple) else (a, {}) for a in answers]

    def for_path(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def ids(self) -> list[str]:
        with self._lock:
            return [r.webhook_id or "" for r in self.received]

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def verify(self, received: Received, secret: str) -> dict[str, Any]:
        """Verify with the ``standardwebhooks`` package; raises if it fails."""
        from standardwebhooks.webhooks import Webhook

        return Webhook(secret).verify(received.body, received.headers)  # type: ignore[no-any-return]

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        with self._lock:
            queue = self._scripts.get(request.path)
            status, headers = queue.pop(0) if queue else (200, {})
            self.received.append(
                Received(
                    request.path,
                    {k.lower(): v for k, v in request.headers.items()},
                    body,
                    status,
                    time.time(),
                )
            )
        return web.Response(status=status, text="ok" if status < 300 else "no", headers=headers)

    def start(self) -> WebhookReceiver:
        def serve() -> None:
            from aiohttp import web

            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=8 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            self._runner = runner
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="webhook-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("webhook receiver did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data)


@dataclass
class _SmtpScript:
    # recipient -> list of SMTP replies to give at RCPT, then accept
    rcpt: dict[str, list[str]] = field(default_factory=dict)


class SmtpReceiver:
    """An aiosmtpd server recording every mail; scripted RCPT refusals."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mails: list[Mail] = []
        self._script = _SmtpScript()
        self._lock = threading.Lock()
        self._controller: Any = None

    def refuse(self, recipient: str, replies: Iterable[str]) -> None:
        """Answer RCPT TO for ``recipient`` with these replies (e.g. ``"451 try later"``)."""
        with self._lock:
            self._script.rcpt[recipient.lower()] = list(replies)

    def to(self, recipient: str) -> list[Mail]:
        with self._lock:
            return [m for m in self.mails if recipient in m.rcpt_tos]

    def count(self) -> int:
        with self._lock:
            return len(self.mails)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:  # noqa: N802
        with self._lock:
            replies = self._script.rcpt.get(address.lower())
            if replies:
                return replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self._lock:
            self.mails.append(
                Mail(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    bytes(envelope.content),
                    time.time(),
                )
            )
        return "250 Message accepted"

    def start(self) -> SmtpReceiver:
        from aiosmtpd.controller import Controller

        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


class QueueConsumer:
    """A plain kombu consumer collecting JSON envelopes from named queues."""

    def __init__(self, url: str, queues: Iterable[str]) -> None:
        self.url = url
        self.queues = list(queues)
        self.envelopes: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def for_queue(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for q, e in self.envelopes if q == name]

    def count(self) -> int:
        with self._lock:
            return len(self.envelopes)

    def start(self) -> QueueConsumer:
        def consume() -> None:
            from kombu.connection import Connection
            from kombu.entity import Queue

            def on_message(body: Any, message: Any) -> None:
                data = json.loads(body) if isinstance(body, bytes | str) else body
                queue = message.delivery_info.get("routing_key", "")
                with self._lock:
                    self.envelopes.append((queue, data))
                message.ack()

            # Reconnect until stopped: the broker may restart under us.
            while not self._stop.is_set():
                try:
                    with Connection(self.url) as conn:
                        queues = [Queue(name, durable=True) for name in self.queues]
                        with conn.Consumer(queues, callbacks=[on_message], accept=["json"]):
                            self._ready.set()
                            while not self._stop.is_set():
                                try:
                                    conn.drain_events(timeout=0.2)
                                except TimeoutError:
                                    continue
                except Exception:  # connection lost: wait and reconnect
                    self._stop.wait(0.5)

        self._thread = threading.Thread(target=consume, name="queue-consumer", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("queue consumer did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
