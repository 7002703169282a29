"""Ingress fixtures: ``channels ingress`` as a real process over the e2e stack.

The stack (embedded PostgreSQL and Valkey, a real Celery worker and beat,
real receivers) is the end-to-end suite's; the ingress is started the way
users start it, ``python -m channels_cli.main ingress --port P``, with the
same environment as the worker, and stopped by PID.

``tests/`` is on ``sys.path`` (the root conftest lives there and has no
``__init__.py``), so ``e2e.conftest`` is the very module pytest loads for
the end-to-end suite: one copy of the fixtures, not two.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from e2e import conftest as e2e
from e2e.conftest import Stack
from sqlalchemy import func, select

from channels_cli.devservers import free_port
from channels_cli.processes import Process
from channels_core import db, tokens
from channels_core.models import DeliveryRow, IdempotencyRow, MessageRow, OutboxRow
from channels_core.names import ROUTE_TASK
from channels_core.permissions import MANAGE, SUBMIT, SUBSCRIBE
from channels_core.primitives import Channel, Permission, Principal, Role

pytestmark = pytest.mark.e2e

# Hypothesis (under schemathesis) keeps caches in ./.hypothesis; keep them in
# this session's temporary home instead of the working tree.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(os.environ["CHANNELS_HOME"], "hypothesis")
)

# The end-to-end suite's fixtures, offered to this directory's tests.
e2e_database_url = e2e.e2e_database_url
stack = e2e.stack
live = e2e.live


@dataclass
class Ingress:
    process: Process
    base_url: str


@pytest.fixture(scope="module")
def ingress(stack: Stack) -> Iterator[Ingress]:
    """``channels ingress`` on a free 127.0.0.1 port, against the stack's database and broker."""
    port = free_port()
    process = Process(
        "ingress",
        [sys.executable, "-m", "channels_cli.main", "ingress", "--port", str(port)],
        {**stack.env, "CHANNELS_INGRESS_HOST": "127.0.0.1"},
        stack.logs / "ingress.log",
    )
    try:
        process.wait_for_log("Application startup complete", timeout=60)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{base_url}/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, process.log()[-3000:]
            time.sleep(0.2)
        yield Ingress(process, base_url)
    finally:
        process.stop()


@pytest.fixture
async def api(live: Stack, ingress: Ingress) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=ingress.base_url, timeout=30) as client:
        yield client
    assert ingress.process.alive(), ingress.process.log()[-3000:]


# -- building blocks -------------------------------------------------------------------


@dataclass
class Caller:
    principal: Principal
    token: str
    token_id: int

    @property
    def id(self) -> int:
        assert self.principal.id is not None
        return self.principal.id

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def tag() -> str:
    return uuid.uuid4().hex[:10]


async def caller(*permissions: str) -> Caller:
    """A principal holding ``permissions`` through a role of its own, with a fresh token."""
    principal = Principal("service").set_username(f"ingress-{tag()}")
    if permissions:
        role = Role().set_title(f"ingress-role-{tag()}")
        for title in permissions:
            perm = await Permission.get_or_create(title)
            assert perm.id is not None
            role.add_permission(perm.id)
        await role.save()
        assert role.id is not None
        principal.add_role(role.id)
    await principal.save()
    assert principal.id is not None
    issued = await tokens.issue(principal.id)
    return Caller(principal, issued.token, issued.id)


async def submitter() -> Caller:
    return await caller(SUBMIT)


async def manager() -> Caller:
    return await caller(SUBMIT, SUBSCRIBE, MANAGE)


async def http_channel(**aliases: str) -> Channel:
    channel: Channel = Channel().set_title(f"ingress {tag()}").set_alias("egress_transport", "http")
    for key, value in aliases.items():
        channel.set_alias(key, value)
    return await channel.save()


async def counts(*channel_ids: int) -> dict[str, int]:
    """Rows of the tables a submission writes.

    Global for messages, outbox and idempotency keys (nothing else writes
    them while a test runs); deliveries on the given channels, since the
    sweeper may still be routing another module's leftovers elsewhere.
    """
    async with db.session() as s:
        return {
            "messages": int(await s.scalar(select(func.count()).select_from(MessageRow)) or 0),
            "outbox": int(await s.scalar(select(func.count()).select_from(OutboxRow)) or 0),
            "idempotency_keys": int(
                await s.scalar(select(func.count()).select_from(IdempotencyRow)) or 0
            ),
            "deliveries": int(
                await s.scalar(
                    select(func.count()).where(DeliveryRow.channel_id.in_(list(channel_ids)))
                )
                or 0
            ),
        }


def routes_received(stack: Stack) -> int:
    """Routing tasks the worker has received so far, from its log."""
    return stack.worker.log().count(f"Task {ROUTE_TASK}[")


async def settle(timeout: float = 20.0) -> None:
    """Wait until no outbox entry is unrouted: from then on, only a new submission
    can make the sweeper or the producer enqueue a routing task."""
    deadline = time.monotonic() + timeout
    while True:
        async with db.session() as s:
            waiting = await s.scalar(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.routed_at.is_(None))
            )
        if not waiting:
            return
        assert time.monotonic() < deadline, f"{waiting} outbox entries still unrouted"
        await asyncio.sleep(0.2)
