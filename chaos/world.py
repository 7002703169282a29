"""What a scenario needs around its fault: data, receivers, waiting, reconciling.

``World`` holds one scenario's scene (processes), its receivers, an event
loop for the Python API (authors, channels, subscribers, sends) and the
accepted ledger; scenarios in ``chaos.scenarios`` only say what is special
about their fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert

from channels_cli.devservers import QueueConsumer
from channels_cli.processes import Process
from channels_core import db
from channels_core.models import PrincipalRow, SubscriptionRow
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Permission, Principal, Role
from chaos.ledger import Accepted, Result, reconcile, unsettled
from chaos.receivers import FaultySmtp, HttpSink, LoopThread, Receipt, queue_receipts
from chaos.stack import Chaos, Crew, Scene
from producer import AsyncProducer

__all__ = ["World", "Subscribers"]

# A receiver may hear of a delivery after the database records it: the queue
# consumer reads an envelope some time after the worker published it and
# wrote its row (a batch's 50 envelopes took it over 100 ms on a loaded
# machine). Reconciling waits this long for the receivers to catch up; what
# is still unheard then is reported lost.
RECEIVER_LAG = 5.0


@dataclass
class Subscribers:
    channel_id: int
    ids: list[int]
    keys: dict[str, int]  # how a receiver names each one -> subscriber id


@dataclass
class World:
    chaos: Chaos
    scene: Scene
    quick: bool
    api: LoopThread
    sink: HttpSink | None = None
    smtp: FaultySmtp | None = None
    queues: QueueConsumer | None = None
    extra_receipts: list[Callable[[], list[Receipt]]] = field(default_factory=list)
    accepted: Accepted = field(default_factory=Accepted)
    channels: list[Subscribers] = field(default_factory=list)
    author_id: int = 0
    crew: Crew | None = None  # the shared worker and beat, for a scenario that may use them

    # -- receivers ----------------------------------------------------------------

    def http(self, **kwargs: Any) -> HttpSink:
        self.sink = HttpSink(**kwargs).start()
        self.scene.cleanups.append(self.sink.stop)
        return self.sink

    def queue(self, names: Iterable[str]) -> QueueConsumer:
        self.queues = QueueConsumer(self.chaos.queue_url, list(names)).start()
        self.scene.cleanups.append(self.queues.stop)
        return self.queues

    def receipts(self) -> list[Receipt]:
        out: list[Receipt] = []
        if self.sink is not None:
            out += self.sink.snapshot()
        if self.smtp is not None:
            out += self.smtp.snapshot()
        if self.queues is not None:
            with self.queues._lock:
                envelopes = list(self.queues.envelopes)
            out += queue_receipts(envelopes)
        for more in self.extra_receipts:
            out += more()
        return out

    # -- processes ------------------------------------------------------------------

    def processes(self, env: dict[str, str] | None = None) -> tuple[Process, Process]:
        """The worker and beat this scenario works on: the shared ones, or its own."""
        if self.crew is not None and env is None:
            return self.crew.ensure()
        return self.scene.start_pair(env)

    def replacement_worker(self, what: str) -> Process:
        """A new worker after the old one's death; it becomes the shared one."""
        if self.crew is not None:
            worker = self.crew.scene.start_worker(what)
            self.crew.replace(worker)
            return worker
        return self.scene.start_worker(what)

    # -- data -----------------------------------------------------------------------

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return self.api.run(coro, timeout)

    def author(self) -> int:
        async def make() -> int:
            perm = await Permission.get_or_create(SUBMIT)
            role = Role().set_title(f"chaos-{self.scene.name}").add_permission(perm.id)  # type: ignore[arg-type]
            await role.save()
            principal = Principal("service").set_username(f"chaos-{self.scene.name}")
            principal.add_role(role.id)  # type: ignore[arg-type]
            await principal.save()
            assert principal.id is not None
            return principal.id

        self.author_id = self.run(make())
        return self.author_id

    def channel(
        self, transport: str, aliases: list[dict[str, str]], keys: list[str]
    ) -> Subscribers:
        """A channel on ``transport`` with one subscriber per alias set (bulk insert)."""

        async def make() -> Subscribers:
            ch = await (
                Channel()
                .set_title(f"{self.scene.name} {transport} {len(self.channels)}")
                .set_alias("egress_transport", transport)
                .save()
            )
            assert ch.id is not None
            async with db.session() as s, s.begin():
                ids = list(
                    await s.scalars(
                        insert(PrincipalRow).returning(PrincipalRow.id),
                        [{"kind": "bot", "aliases": a} for a in aliases],
                    )
                )
                await s.execute(
                    insert(SubscriptionRow),
                    [{"channel_id": ch.id, "subscriber_id": i} for i in ids],
                )
            return Subscribers(ch.id, ids, {})

        subs: Subscribers = self.run(make())
        # Receivers name a subscriber by path, address or id; the ledger maps back.
        subs.keys = {k: i for k, i in zip(keys, subs.ids, strict=True)} if keys else {}
        subs.keys.update({str(i): i for i in subs.ids})
        self.channels.append(subs)
        self.accepted.keys.update(subs.keys)
        return subs

    def send(self, count: int = 1, channels: list[Subscribers] | None = None) -> list[int]:
        """Send ``count`` messages to the channels; record the accepted pairs."""
        targets = channels or self.channels
        ids = [c.channel_id for c in targets]

        async def go() -> list[int]:
            dispatches = await AsyncProducer().send_many(
                [
                    {"content": f"{self.scene.name} #{i}", "author_id": self.author_id}
                    for i in range(count)
                ],
                ids,
            )
            return [d.message_id for d in dispatches if d.message_id is not None]

        message_ids: list[int] = self.run(go())
        self.accept(message_ids, targets)
        return message_ids

    def accept(self, message_ids: Iterable[int], targets: list[Subscribers] | None = None) -> None:
        for m in message_ids:
            for c in targets or self.channels:
                self.accepted.pairs.update((m, s) for s in c.ids)

    # -- waiting --------------------------------------------------------------------

    def final_count(self, status: str = "delivered") -> int:
        with contextlib.suppress(Exception), self.chaos.admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM deliveries WHERE message_id = ANY(%s) AND status = %s",
                (self.accepted.message_ids, status),
            ).fetchone()
            return int(row[0]) if row else 0
        return 0

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:g}s")
            time.sleep(0.05)

    def wait_delivered(self, fraction: float, timeout: float = 90.0) -> int:
        """Until this share of the accepted pairs is delivered: the fault goes in mid-flight."""
        want = max(1, int(len(self.accepted.pairs) * fraction))
        self.wait_for(lambda: self.final_count() >= want, timeout, f"{want} deliveries")
        return self.final_count()

    def settle(self, since: float, timeout: float) -> float:
        """Seconds from ``since`` until every accepted pair is final (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if unsettled(self.chaos, self.accepted) == 0:
                    break
            except Exception:  # the database may be the thing restarting
                pass
            time.sleep(0.2)
        return time.monotonic() - since

    def unheard(self) -> int:
        """Deliveries the database calls delivered that no receiver acknowledged yet."""
        heard = {r.delivery_id for r in self.receipts() if r.acked}
        with self.chaos.admin() as conn:
            rows = conn.execute(
                "SELECT id FROM deliveries WHERE message_id = ANY(%s) AND status = 'delivered'",
                (self.accepted.message_ids,),
            ).fetchall()
        return sum(1 for (delivery_id,) in rows if delivery_id not in heard)

    def reconcile(self, settle_s: float) -> Result:
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            self.wait_for(lambda: self.unheard() == 0, RECEIVER_LAG, "receivers catching up")
        lag = time.monotonic() - started
        result = reconcile(self.chaos, self.scene.name, self.accepted, self.receipts())
        result.settle_s = settle_s
        if lag >= 0.1:
            result.notes.append(f"waited {lag:.1f}s for receivers to hear what the database had")
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(db.dispose(), timeout=10)


def new_api_loop() -> LoopThread:
    loop = LoopThread("chaos-api")
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop.loop).result(5)
    return loop
