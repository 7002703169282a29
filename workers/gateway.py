"""The WebSocket gateway: holds subscribers' connections and writes their deliveries.

``channels gateway`` runs ``run(host, port)``. Any number of gateways, on
any number of hosts, share one Redis-compatible server; the protocol (keys,
requests, answers, frames) is defined once in
``channels_core.transports.websocket`` and summarized here from the
client's side.

Connecting: ``ws://HOST:PORT/?token=chn_...`` or an ``Authorization: Bearer
chn_...`` header (browsers cannot set headers), optionally
``&last_delivery_id=N``. The handshake always completes so that browsers can
read why a connection is refused, then the gateway closes with:

- 4400 a malformed ``last_delivery_id``;
- 4401 a missing, unknown or revoked token;
- 4403 an inactive principal;
- 1013 the database or Redis is unreachable now (try again later);
- 1008 the client reads too slowly: more than ``ws_max_queue_bytes`` queued;
- 1001 the gateway is shutting down (SIGTERM / SIGINT).

Frames, server to client (UTF-8 JSON text; anything the client sends is
ignored; keepalive pings every ``ws_heartbeat`` seconds)::

    {"type": "delivery", "delivery_id": 17, "message": {"id", "channel_id", "author_id",
     "content", "content_type", "reply_to_id", "conversation_id", "created_at"}}
    {"type": "ready", "principal_id": 5, "gateway_id": "...", "resumed": 3}

Every accepted connection gets ``ready`` once it is registered: from then on
deliveries reach it.

Resume: with ``last_delivery_id=N`` the client first gets, in id order,
every websocket delivery to it with id > N that is final: dead ones (it was
not connected) and delivered ones (it was connected elsewhere, or the
frame was lost with the old socket). Then ``ready``, then live traffic;
live deliveries arriving during the resume are held and sent after it,
without the ones the resume already sent. A dead delivery sent on resume
becomes delivered, with one more attempt row saying so
(``RESUME_NOTE``), so the database tells the truth; a delivered one is only
re-sent. A delivery whose worker looked for the client just before it
registered ends dead a moment later; one more pass after
``gateway_ack_timeout`` (set it as the workers' is) sends those too.
Clients deduplicate by ``delivery_id`` (delivery is at least once). The id
is a high-water mark: a delivery with a lower id that was still retrying
when the client saw a higher one, and then ended dead, is not resent.

A delivery counts as delivered when a live connection of the principal on
this gateway accepted the frame into its bounded outgoing queue. This
module must never let one slow socket delay another: each connection has
its own queue and writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from channels_core import db, logs, tokens
from channels_core.errors import AuthenticationError
from channels_core.models import (
    AttemptRow,
    AttemptStatus,
    DeliveryRow,
    DeliveryStatus,
    MessageRow,
    PrincipalRow,
    utcnow,
)
from channels_core.settings import Settings, get_settings
from channels_core.transports.websocket import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHORIZED,
    DELIVERED,
    GATEWAYS_KEY,
    NOT_CONNECTED,
    ack_key,
    delivery_frame,
    gateway_key,
    inbox_key,
    message_payload,
    presence_key,
    presence_url,
)

__all__ = [
    "Gateway",
    "run",
    "serve_until_stopped",
    "RESUME_NOTE",
    "CLOSE_TOO_SLOW",
    "CLOSE_TRY_AGAIN",
]

log = logging.getLogger("channels.gateway")

CLOSE_TOO_SLOW = 1008  # policy violation: the client does not read its deliveries
CLOSE_TRY_AGAIN = 1013  # a dependency (database, Redis) is down; reconnect later
RESUME_NOTE = "delivered on reconnect (resumed after delivery {after}) by gateway {gateway}"

_TRANSPORT = "websocket"
_RESUME_PAGE = 500
# Answers live this long if the worker that waits for them is gone.
_ACK_TTL_MS = 60_000
# Requests popped, and answers written, per round trip once there is work.
_INBOX_BATCH = 100
_ANSWER_BATCH = 500
_REDIS_TIMEOUT = 10.0
# Clients send nothing but control frames; anything big is abuse.
_MAX_INCOMING = 64 * 1024
_CLOSE_TIMEOUT = 5.0


def _gateway_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class _Admission:
    """What the handshake decided, handed to the connection's handler."""

    principal_id: int | None = None
    last_delivery_id: int | None = None
    refusal: tuple[int, str] | None = None


class _Connection:
    """One client socket: its own outgoing queue, bounded in bytes, and writer."""

    def __init__(self, ws: ServerConnection, principal_id: int, limit: int, resuming: bool):
        self.ws = ws
        self.principal_id = principal_id
        self.limit = limit
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queued_bytes = 0
        # While a resume runs, live frames wait here (with their delivery ids).
        self.held: list[tuple[int | None, bytes]] | None = [] if resuming else None
        self.resumed: set[int] = set()
        self.closing = False
        self.tasks: list[asyncio.Task[None]] = []

    def offer(self, delivery_id: int | None, frame: bytes) -> bool:
        """Queue ``frame`` unless the client is already too far behind.

        The bound is on what waits: a frame bigger than the limit still goes
        to a client that has nothing pending, or it could never be delivered.
        """
        if self.closing:
            return False
        buffered = self.queued_bytes + self.ws.transport.get_write_buffer_size()
        if buffered and buffered + len(frame) > self.limit:
            return False
        self.queued_bytes += len(frame)
        if self.held is not None:
            self.held.append((delivery_id, frame))
        else:
            self.queue.put_nowait(frame)
        return True

    def go_live(self) -> None:
        """End the resume: release held frames the resume did not send, start writing."""
        held, self.held = self.held or [], None
        for delivery_id, frame in held:
            if delivery_id is not None and delivery_id in self.resumed:
                self.queued_bytes -= len(frame)
            else:
                self.queue.put_nowait(frame)
        self.tasks.append(asyncio.create_task(self._write()))

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self.queue.get()
                # send() waits while the socket's buffer is above websockets'
                # write limit; meanwhile frames pile up in the queue, counted.
                await self.ws.send(frame, text=True)
                self.queued_bytes -= len(frame)


class Gateway:
    """One gateway process: the server, its presence in Redis, its inbox."""

    def __init__(self, host: str, port: int, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.host = host
        self.port = port
        self.id = _gateway_id()
        self.url = ""
        self.connections: dict[int, set[_Connection]] = {}
        self._admissions: weakref.WeakKeyDictionary[ServerConnection, _Admission] = (
            weakref.WeakKeyDictionary()
        )
        url = presence_url()
        if url is None:
            raise RuntimeError(
                "the gateway needs a Redis-compatible server: set CHANNELS_BROKER_URL "
                "or CHANNELS_QUEUE_URL to a redis:// URL"
            )
        self.redis = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=5,
            # Above the inbox's 1 s BLPOP, so only a Redis that hangs times out.
            socket_timeout=_REDIS_TIMEOUT,
            decode_responses=True,
            health_check_interval=30,
        )
        # Presence writes for one principal must land in the order their local
        # changes happened; one lock keeps every write reading current state.
        self._presence_lock = asyncio.Lock()
        self._stopping = False
        self._info = ""
        self._server: Server | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        # Answers to workers go out in batches, from one task on one connection.
        self._answers: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._answerer: asyncio.Task[None] | None = None
        # Closes of slow connections and their presence updates.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ttl_ms(self) -> int:
        return int(self.settings.ws_presence_ttl * 1000)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._admit,
            ping_interval=self.settings.ws_heartbeat or None,
            ping_timeout=self.settings.ws_heartbeat or None,
            close_timeout=_CLOSE_TIMEOUT,
            max_size=_MAX_INCOMING,
            server_header=None,
        )
        sock = next(iter(self._server.sockets))
        self.port = int(sock.getsockname()[1])
        self.url = f"ws://{self.host}:{self.port}/"
        self._info = json.dumps(
            {
                "url": self.url,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": datetime.now(UTC).isoformat(),
            }
        )
        # Listen for deliveries before announcing ourselves: a worker may push
        # the moment the liveness key appears.
        self._answerer = asyncio.create_task(self._answer())
        self._consumer = asyncio.create_task(self._consume())
        await self._refresh()
        self._heartbeat_task = asyncio.create_task(self._heartbeat())
        log.info("gateway %s listening on %s", self.id, self.url)

    async def stop(self) -> None:
        """Unregister first (workers stop routing here), then close sockets with 1001."""
        if self._stopping:
            return
        self._stopping = True
        log.info("gateway %s stopping", self.id)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        try:
            await self._unregister()
        except (RedisError, OSError) as exc:
            log.warning("gateway %s could not unregister: %s", self.id, exc)
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        try:
            await self._answer_leftovers()
        except (RedisError, OSError) as exc:
            log.warning("gateway %s could not answer its last requests: %s", self.id, exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REDIS_TIMEOUT):
                await self._answers.join()
        if self._answerer is not None:
            self._answerer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
        await db.dispose()
        log.info("gateway %s stopped", self.id)

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        # The set keeps a reference: the loop holds only weak ones to tasks.
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # -- presence ------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Renew liveness and every held principal's presence; prune dead gateways."""
        async with self._presence_lock:
            if self._stopping:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(gateway_key(self.id), self._info, px=self.ttl_ms)
                pipe.sadd(GATEWAYS_KEY, self.id)
                for principal_id in self.connections:
                    pipe.sadd(presence_key(principal_id), self.id)
                    pipe.pexpire(presence_key(principal_id), self.ttl_ms)
                await pipe.execute()
        known = await self.redis.smembers(GATEWAYS_KEY)  # type: ignore[misc]
        others = sorted(str(g) for g in known if g != self.id)
        if others:
            async with self.redis.pipeline(transaction=False) as pipe:
                for g in others:
                    pipe.exists(gateway_key(g))
                flags = await pipe.execute()
            dead = [g for g, flag in zip(others, flags, strict=True) if not flag]
            if dead:
                await self.redis.srem(GATEWAYS_KEY, *dead)  # type: ignore[misc]

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ws_presence_ttl / 3)
            try:
                await self._refresh()
            except (RedisError, OSError) as exc:
                log.warning("gateway %s could not renew its presence: %s", self.id, exc)

    async def _sync_presence(self, principal_id: int) -> None:
        """Make Redis say what this process knows: does it hold ``principal_id``?"""
        async with self._presence_lock:
            key = presence_key(principal_id)
            async with self.redis.pipeline(transaction=False) as pipe:
                if not self._stopping and principal_id in self.connections:
                    pipe.sadd(key, self.id)
                    pipe.pexpire(key, self.ttl_ms)
                else:
                    pipe.srem(key, self.id)
                await pipe.execute()

    async def _unregister(self) -> None:
        async with self._presence_lock, self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(gateway_key(self.id))
            pipe.srem(GATEWAYS_KEY, self.id)
            for principal_id in self.connections:
                pipe.srem(presence_key(principal_id), self.id)
            await pipe.execute()

    # -- connections ---------------------------------------------------------------------

    async def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        """Authenticate during the handshake; the handler closes refused connections."""
        admission = _Admission()
        self._admissions[ws] = admission
        query = parse_qs(urlsplit(request.path).query)
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        token = credential.strip() if scheme.lower() == "bearer" else ""
        token = token or next(iter(query.get("token", [])), "")
        raw_last = next(iter(query.get("last_delivery_id", [])), None)
        if raw_last is not None:
            # isdigit() alone accepts "²", which int() refuses.
            if not (raw_last.isascii() and raw_last.isdigit()) or len(raw_last) > 18:
                admission.refusal = (CLOSE_BAD_REQUEST, "last_delivery_id must be an integer >= 0")
                return None
            admission.last_delivery_id = int(raw_last)
        try:
            principal_id = await tokens.authenticate(token)
            async with db.session() as s:
                active = await s.scalar(
                    select(PrincipalRow.active).where(PrincipalRow.id == principal_id)
                )
        except AuthenticationError as exc:
            admission.refusal = (CLOSE_UNAUTHORIZED, str(exc))
            return None
        except (SQLAlchemyError, OSError) as exc:
            log.warning("gateway %s could not authenticate a client: %s", self.id, exc)
            admission.refusal = (CLOSE_TRY_AGAIN, "the database is unavailable; try again later")
            return None
        if not active:
            admission.refusal = (CLOSE_FORBIDDEN, f"principal {principal_id} is inactive")
            return None
        admission.principal_id = principal_id
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        admission = self._admissions.pop(ws, None) or _Admission(refusal=(1011, "no admission"))
        if admission.refusal is not None or admission.principal_id is None:
            code, reason = admission.refusal or (1011, "no admission")
            await ws.close(code, reason[:120])
            return
        if self._stopping:
            await ws.close(1001, "gateway is shutting down")
            return
        principal_id = admission.principal_id
        after = admission.last_delivery_id
        conn = _Connection(ws, principal_id, self.settings.ws_max_queue_bytes, after is not None)
        self.connections.setdefault(principal_id, set()).add(conn)
        try:
            try:
                await self._sync_presence(principal_id)
            except (RedisError, OSError) as exc:
                log.warning("gateway %s could not register a connection: %s", self.id, exc)
                await ws.close(CLOSE_TRY_AGAIN, "presence store unavailable; try again later")
                return
            resumed = 0
            if after is not None:
                resumed = await self._resume(
                    conn, after, (DeliveryStatus.DEAD, DeliveryStatus.DELIVERED)
                )
            ready = {
                "type": "ready",
                "principal_id": principal_id,
                "gateway_id": self.id,
                "resumed": resumed,
            }
            await ws.send(json.dumps(ready))
            conn.go_live()
            if after is not None:
                conn.tasks.append(asyncio.create_task(self._catch_up(conn, after)))
            async for _ in ws:
                pass  # clients have nothing to say; reading keeps pings and close working
        except ConnectionClosed:
            pass
        except (SQLAlchemyError, OSError) as exc:
            log.warning(
                "gateway %s could not resume for principal %s: %s", self.id, principal_id, exc
            )
            await ws.close(CLOSE_TRY_AGAIN, "the database is unavailable; try again later")
        finally:
            await self._detach(conn)

    async def _detach(self, conn: _Connection) -> None:
        conn.closing = True
        for task in conn.tasks:
            task.cancel()
        held = self.connections.get(conn.principal_id)
        if held is not None:
            held.discard(conn)
            if not held:
                del self.connections[conn.principal_id]
                with contextlib.suppress(RedisError, OSError):
                    await self._sync_presence(conn.principal_id)

    def _drop_slow(self, conn: _Connection) -> None:
        """Close a connection whose client does not keep up, and stop counting on it."""
        if conn.closing:
            return
        conn.closing = True
        log.warning(
            "gateway %s closing a connection of principal %s: over %d bytes queued",
            self.id,
            conn.principal_id,
            conn.limit,
        )
        reason = f"too slow: more than {conn.limit} bytes queued"
        self._spawn(self._tasks, conn.ws.close(CLOSE_TOO_SLOW, reason))
        held = self.connections.get(conn.principal_id)
        if held is not None:
            held.discard(conn)
            if not held:
                del self.connections[conn.principal_id]
                self._spawn(self._tasks, self._quietly(self._sync_presence(conn.principal_id)))

    # -- resume ------------------------------------------------------------------------

    async def _missed(
        self, principal_id: int, after: int, statuses: Sequence[str]
    ) -> list[tuple[int, str, bytes]]:
        """Up to a page of final deliveries to ``principal_id`` after ``after``, by id."""
        async with db.session() as s:
            rows = await s.execute(
                select(DeliveryRow.id, DeliveryRow.status, DeliveryRow.channel_id, MessageRow)
                .join(MessageRow, MessageRow.id == DeliveryRow.message_id)
                .where(
                    DeliveryRow.subscriber_id == principal_id,
                    DeliveryRow.transport == _TRANSPORT,
                    DeliveryRow.id > after,
                    DeliveryRow.status.in_(list(statuses)),
                )
                .order_by(DeliveryRow.id)
                .limit(_RESUME_PAGE)
            )
            return [
                (delivery_id, status, delivery_frame(delivery_id, message_payload(m, channel_id)))
                for delivery_id, status, channel_id, m in rows
            ]

    async def _resume(self, conn: _Connection, after: int, statuses: Sequence[str]) -> int:
        """Send what the client missed, straight to the socket (it waits for the client)."""
        sent = 0
        last = after
        while True:
            page = await self._missed(conn.principal_id, last, statuses)
            for delivery_id, _, frame in page:
                await conn.ws.send(frame, text=True)
                conn.resumed.add(delivery_id)
            sent += len(page)
            await self._record_resumed(
                [d for d, status, _ in page if status == DeliveryStatus.DEAD], after
            )
            if len(page) < _RESUME_PAGE:
                return sent
            last = page[-1][0]

    async def _catch_up(self, conn: _Connection, after: int) -> None:
        """Later, send dead deliveries whose worker looked just before this client registered."""
        await asyncio.sleep(self.settings.gateway_ack_timeout + 1)
        try:
            page = await self._missed(conn.principal_id, after, (DeliveryStatus.DEAD,))
            accepted = [d for d, _, frame in page if conn.offer(d, frame)]
            if len(accepted) < len(page):
                self._drop_slow(conn)
            await self._record_resumed(accepted, after)
        except (SQLAlchemyError, OSError) as exc:
            log.warning(
                "gateway %s catch-up failed for principal %s: %s", self.id, conn.principal_id, exc
            )

    async def _record_resumed(self, delivery_ids: list[int], after: int) -> None:
        """Dead deliveries just sent become delivered, with an attempt row saying how."""
        if not delivery_ids:
            return
        now = utcnow()
        async with db.session() as s, s.begin():
            changed = (
                await s.execute(
                    update(DeliveryRow)
                    .where(
                        DeliveryRow.id.in_(delivery_ids),
                        # A replay may have taken it back meanwhile: leave it to the replay.
                        DeliveryRow.status == DeliveryStatus.DEAD,
                    )
                    .values(
                        status=DeliveryStatus.DELIVERED,
                        attempts=DeliveryRow.attempts + 1,
                        delivered_at=now,
                        updated_at=now,
                        last_error=None,
                        last_status_code=None,
                        next_attempt_at=None,
                        queued_until=None,
                    )
                    .returning(DeliveryRow.id, DeliveryRow.attempts)
                    .execution_options(synchronize_session=False)
                )
            ).all()
            if not changed:
                return
            dialect = s.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            note = RESUME_NOTE.format(after=after, gateway=self.id)
            await s.execute(
                insert(AttemptRow).on_conflict_do_nothing(),
                [
                    {
                        "delivery_id": delivery_id,
                        "attempt": attempt,
                        "transport": _TRANSPORT,
                        "status": AttemptStatus.DELIVERED,
                        "status_code": None,
                        "error": note,
                        "latency_ms": None,
                        "started_at": now,
                        "finished_at": now,
                    }
                    for delivery_id, attempt in changed
                ],
            )

    # -- the inbox: deliveries from workers ----------------------------------------------

    async def _consume(self) -> None:
        inbox = inbox_key(self.id)
        backoff = 0.1
        while True:
            try:
                popped: Any = await self.redis.blpop([inbox], timeout=1)  # type: ignore[misc]
                items = [str(popped[1])] if popped else []
                if items:
                    items.extend(await self._pop(inbox))
                backoff = 0.1
            except (RedisError, OSError) as exc:
                log.warning("gateway %s lost its inbox: %s; retrying", self.id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for item in items:
                self._deliver(item)

    def _deliver(self, raw: str, *, shutting_down: bool = False) -> None:
        """Write one request's deliveries to local sockets and answer the worker."""
        try:
            request = json.loads(raw)
            key = str(request["ack"])
            deliveries = [(d, int(p)) for d, p in request["deliveries"]]
            payload = request["message"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("gateway %s dropped a malformed request: %s", self.id, exc)
            return
        outcomes: list[list[Any]] = []
        for delivery_id, principal_id in deliveries:
            accepted = False
            if not shutting_down:
                frame = delivery_frame(delivery_id, payload)
                for conn in list(self.connections.get(principal_id, ())):
                    if conn.offer(delivery_id, frame):
                        accepted = True
                    elif not conn.closing:
                        self._drop_slow(conn)
            outcomes.append([principal_id, DELIVERED if accepted else NOT_CONNECTED])
        answer = json.dumps({"gateway": self.id, "outcomes": outcomes}, separators=(",", ":"))
        if key.startswith(ack_key("")):  # only ever write where answers go
            self._answers.put_nowait((key, answer))

    async def _answer(self) -> None:
        """Write queued answers, all that are waiting in one round trip."""
        while True:
            batch = [await self._answers.get()]
            while not self._answers.empty() and len(batch) < _ANSWER_BATCH:
                batch.append(self._answers.get_nowait())
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, answer in batch:
                        pipe.rpush(key, answer)
                        pipe.pexpire(key, _ACK_TTL_MS)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                # The workers waiting for these time out and retry the deliveries.
                log.warning("gateway %s could not answer %d requests: %s", self.id, len(batch), exc)
            finally:
                for _ in batch:
                    self._answers.task_done()

    async def _answer_leftovers(self) -> None:
        """Requests still queued at shutdown: their sockets are gone, say so now."""
        inbox = inbox_key(self.id)
        while items := await self._pop(inbox):
            for item in items:
                self._deliver(item, shutting_down=True)
        await self.redis.delete(inbox)

    async def _pop(self, inbox: str) -> list[str]:
        """Up to a batch of requests, without waiting."""
        items: Any = await self.redis.lpop(inbox, _INBOX_BATCH)
        return [str(item) for item in items or ()]

    async def _quietly(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except (RedisError, OSError) as exc:
            log.warning("gateway %s could not update presence: %s", self.id, exc)


async def serve_until_stopped(host: str, port: int, stop: asyncio.Event) -> None:
    """Run one gateway until ``stop`` is set, then shut it down cleanly."""
    gateway = Gateway(host, port)
    await gateway.start()
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def run(host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT (``channels gateway``)."""
    settings = get_settings()
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    if logs.wants_json(settings.log_format):
        logs.use_json([logging.getLogger()])
    # websockets logs every handshake at INFO; our own lines say what matters.
    logging.getLogger("websockets").setLevel(logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_until_stopped(
            host if host is not None else settings.gateway_host,
            port if port is not None else settings.gateway_port,
            stop,
        )

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
