"""Endpoint health against the real Valkey: breaker, rate limit, in-flight cap, switch.

The gate is driven directly (admit, then settle with made-up outcomes), so
each transition is checked on its own; the end-to-end tests in
``tests/e2e/test_endpoint_health.py`` show the same against real workers and
a real HTTP server. Every test uses endpoints of its own, so the shared
Redis state of one test never meets another's.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from channels_core import endpoints
from channels_core.endpoints import Admission, Gate
from channels_core.errors import NotFoundError, ValidationError
from channels_core.primitives import Principal
from channels_core.settings import Settings, configure, get_settings
from channels_core.transports.base import TransportResult

_ids = itertools.count(1)


@pytest.fixture
def tune(database: str, broker_url: str) -> Iterator[Callable[..., Settings]]:
    previous = get_settings()

    def apply(**values: Any) -> Settings:
        return configure(get_settings().model_copy(update=values))

    apply(broker_url=broker_url)
    yield apply
    configure(previous)


@pytest.fixture
def gate(tune: Callable[..., Settings]) -> Gate:
    return Gate()


def new_url() -> str:
    return f"http://127.0.0.1:9/hook/{uuid.uuid4().hex[:12]}"


def people(url: str, count: int) -> list[Principal]:
    found = []
    for _ in range(count):
        principal = Principal("bot").set_alias("endpoint", url)
        principal.id = next(_ids)
        principal.delivery_id = 10**9 + principal.id  # bookings are keyed by delivery
        found.append(principal)
    return found


def endpoint_of(principal: Principal) -> str | None:
    return principal.get_alias("endpoint")


def outcome(principal: Principal, kind: str) -> TransportResult:
    assert principal.id is not None
    if kind == "ok":
        return TransportResult.delivered(principal.id, status_code=200)
    if kind == "gone":
        return TransportResult.failed(principal.id, "HTTP 410", permanent=True, status_code=410)
    return TransportResult.failed(principal.id, "HTTP 503", status_code=503)


async def settle(gate: Gate, admission: Admission, kind: str) -> None:
    sent = admission.allowed + admission.held
    await gate.settle(admission, [outcome(p, kind) for p in sent])


async def known_good(gate: Gate, url: str) -> None:
    """One success, so the endpoint is no longer cold (no canary first)."""
    first = await gate.admit(endpoint_of, people(url, 1))
    await settle(gate, first, "ok")


async def recorded(url: str) -> list[str]:
    return [e.event for e in reversed(await endpoints.events(url))]


# -- breaker -----------------------------------------------------------------------------


async def test_a_cold_endpoint_gets_one_canary_and_holds_the_rest(gate: Gate) -> None:
    url = new_url()
    admission = await gate.admit(endpoint_of, people(url, 6))
    assert (len(admission.allowed), len(admission.held), admission.deferred) == (1, 5, {})

    await settle(gate, admission, "ok")
    warm = await gate.admit(endpoint_of, people(url, 6))
    assert (len(warm.allowed), warm.held) == (6, [])
    await settle(gate, warm, "ok")


async def test_breaker_opens_probes_once_doubles_its_cool_down_and_closes(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(breaker_threshold=3, breaker_cooldown=0.4, breaker_cooldown_max=5)
    url = new_url()
    await known_good(gate, url)

    # Three failures in one go: open.
    first = await gate.admit(endpoint_of, people(url, 3))
    assert len(first.allowed) == 3
    await settle(gate, first, "down")
    view = await endpoints.get_endpoint(url)
    assert (view.breaker, view.failures) == ("open", 3)

    # Open: nothing goes, everyone waits about the cool-down, no attempt spent.
    waiting = await gate.admit(endpoint_of, people(url, 4))
    assert waiting.allowed == [] and len(waiting.deferred) == 4
    assert all(
        0.2 <= wait <= 0.45 and "circuit open" in why for wait, why in waiting.deferred.values()
    )
    await settle(gate, waiting, "ok")  # nothing was sent: nothing changes
    assert (await endpoints.get_endpoint(url)).breaker == "open"

    # Cool-down over: exactly one probe among two concurrent callers.
    await asyncio.sleep(0.45)
    a, b = await asyncio.gather(
        gate.admit(endpoint_of, people(url, 4)), gate.admit(endpoint_of, people(url, 4))
    )
    assert sorted([len(a.allowed), len(b.allowed)]) == [0, 1]
    probe = a if a.allowed else b
    # The probe fails: open again for twice as long.
    await settle(gate, probe, "down")
    await asyncio.sleep(0.45)
    still = await gate.admit(endpoint_of, people(url, 2))
    assert still.allowed == [] and "circuit open" in next(iter(still.deferred.values()))[1]
    await asyncio.sleep(0.45)
    second = await gate.admit(endpoint_of, people(url, 2))
    assert len(second.allowed) == 1
    await settle(gate, second, "ok")

    closed = await gate.admit(endpoint_of, people(url, 5))
    assert len(closed.allowed) == 5
    await settle(gate, closed, "ok")
    assert await recorded(url) == ["opened", "half_open", "opened", "half_open", "closed"]
    assert (await endpoints.get_endpoint(url)).breaker == "closed"


async def test_after_one_failure_an_endpoint_gets_one_request_at_a_time(gate: Gate) -> None:
    url = new_url()
    await known_good(gate, url)
    failing = await gate.admit(endpoint_of, people(url, 1))
    await settle(gate, failing, "down")
    suspect = await gate.admit(endpoint_of, people(url, 5))
    assert len(suspect.allowed) == 1 and len(suspect.deferred) == 4
    assert all("tested after a failure" in why for _, why in suspect.deferred.values())


# -- rate limits and the in-flight cap --------------------------------------------------------


async def test_rate_limit_books_slots_ahead_and_spaces_the_rest_by_the_rate(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(rate_limit_burst=0.1, rate_limit_hold=0.5, rate_limit_book_ahead=0.5)
    url = new_url()
    await endpoints.set_rate_limit(url, 50)
    await known_good(gate, url)
    await asyncio.sleep(0.1)  # the known-good request's token comes back

    admission = await gate.admit(endpoint_of, people(url, 60))
    # A burst of 5 (0.1 s of 50/s) now, then one slot every 20 ms up to 0.5 s
    # ahead, sent by the batch itself at its slot; the rest wait in the queue.
    booked = [admission.send_at.get(p.id, 0.0) for p in admission.allowed]  # type: ignore[arg-type]
    assert len(booked) == 30 and booked[:5] == [0.0] * 5
    gaps = [b - a for a, b in itertools.pairwise(booked[4:])]
    assert all(abs(gap - 0.02) < 0.001 for gap in gaps), gaps
    assert booked[-1] <= 0.5
    waits = sorted(wait for wait, _ in admission.deferred.values())
    assert len(waits) == 30
    gaps = [b - a for a, b in itertools.pairwise(waits)]
    assert all(abs(gap - 0.02) < 0.002 for gap in gaps), gaps
    assert all("rate limit" in why for _, why in admission.deferred.values())


async def test_a_slot_booked_for_later_is_kept_for_the_delivery_that_booked_it(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(rate_limit_burst=0.1, rate_limit_hold=0.1, rate_limit_book_ahead=1.0)
    url = new_url()
    await endpoints.set_rate_limit(url, 50)
    await known_good(gate, url)
    await asyncio.sleep(0.1)
    crowd = people(url, 80)

    first = await gate.admit(endpoint_of, crowd)
    # Sent by this batch: the burst and slots within the 0.1 s hold.
    assert len(first.allowed) == 10
    booked = {
        p.id: first.deferred[p.id][0]
        for p in crowd
        if "booked slot" in first.deferred.get(p.id, (0, ""))[1]
    }  # type: ignore[index]
    assert 40 <= len(booked) <= 46 and max(booked.values()) <= 1.0
    later = [p for p in crowd if p.id in first.deferred and p.id not in booked]
    assert later and all("rate limit" in first.deferred[p.id][1] for p in later)  # type: ignore[index]

    # The first booked delivery comes back for its slot and goes at once,
    # while a newcomer at the same moment finds no free slot.
    early = min(booked, key=lambda i: booked[i])
    await asyncio.sleep(booked[early] - 0.05)
    back = await gate.admit(endpoint_of, [p for p in crowd if p.id == early])
    assert [p.id for p in back.allowed] == [early] and back.send_at.get(early, 0) <= 0.1
    newcomer = await gate.admit(endpoint_of, people(url, 1))
    assert newcomer.allowed == [] and len(newcomer.deferred) == 1
    # A booking is used once.
    again = await gate.admit(endpoint_of, [p for p in crowd if p.id == early])
    assert again.allowed == []


async def test_a_host_limit_binds_every_endpoint_on_the_host(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(rate_limit_burst=0.1, rate_limit_hold=0)
    host = f"h{uuid.uuid4().hex[:8]}.localhost"
    a, b = f"http://{host}/a", f"http://{host}/b"
    await endpoints.set_host_rate_limit(host, 20)  # a burst of 2
    for url in (a, b):
        await known_good(gate, url)
    await asyncio.sleep(0.2)
    admission = await gate.admit(endpoint_of, people(a, 3) + people(b, 3))
    assert len(admission.allowed) == 2 and len(admission.deferred) == 4
    await endpoints.set_host_rate_limit(host, None)
    assert host not in await endpoints.host_rate_limits()


async def test_in_flight_cap_is_shared_and_released(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(host_max_in_flight=3)
    # A host of its own, so no other test's leases count here.
    url = f"http://c{uuid.uuid4().hex[:8]}.localhost/hook"
    await known_good(gate, url)
    first = await gate.admit(endpoint_of, people(url, 5))
    assert len(first.allowed) == 3 and len(first.deferred) == 2
    assert all("in-flight cap" in why for _, why in first.deferred.values())
    other = await Gate().admit(endpoint_of, people(url, 2))  # another worker
    assert other.allowed == []
    await settle(gate, first, "ok")
    again = await Gate().admit(endpoint_of, people(url, 2))
    assert len(again.allowed) == 2


async def test_a_caller_is_charged_what_it_has_open_at_once_not_what_it_is_admitted(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(host_max_in_flight=10)
    host = f"c{uuid.uuid4().hex[:8]}.localhost"
    a, b = f"http://{host}/a", f"http://{host}/b"
    for url in (a, b):
        await known_good(gate, url)
    # 30 recipients on two endpoints of one host, sent 4 at a time: 4 of the 10.
    wide = await gate.admit(endpoint_of, people(a, 15) + people(b, 15), at_once=4)
    assert len(wide.allowed) == 30 and wide.deferred == {}
    # Another worker sending one request per recipient gets the other 6.
    other = await Gate().admit(endpoint_of, people(a, 8))
    assert len(other.allowed) == 6 and len(other.crowded) == 2
    assert other.crowded == set(other.deferred)
    # The host is full: even a caller sending one at a time waits.
    full = await Gate().admit(endpoint_of, people(b, 3), at_once=1)
    assert full.allowed == [] and len(full.crowded) == 3
    await settle(gate, wide, "ok")
    again = await Gate().admit(endpoint_of, people(b, 3), at_once=1)
    assert len(again.allowed) == 3


async def test_a_rate_limited_caller_is_charged_every_request_it_is_admitted(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    # Sent at booked slots, a batch is several sends at once: at_once no longer bounds it.
    tune(host_max_in_flight=10, rate_limit_burst=0.1, rate_limit_hold=0.25)
    host = f"c{uuid.uuid4().hex[:8]}.localhost"
    url = f"http://{host}/limited"
    await endpoints.set_rate_limit(url, 1000)  # a burst of 100: the rate does not bind
    await known_good(gate, url)
    limited = await gate.admit(endpoint_of, people(url, 8), at_once=2)
    assert len(limited.allowed) == 8
    other = await Gate().admit(endpoint_of, people(f"http://{host}/other", 5))
    assert len(other.allowed) + len(other.held) == 2 and len(other.crowded) == 3


# -- the switch ------------------------------------------------------------------------------


async def test_410_disables_and_a_disabled_endpoint_is_refused_until_enabled(gate: Gate) -> None:
    url = new_url()
    await known_good(gate, url)
    admission = await gate.admit(endpoint_of, people(url, 1))
    await settle(gate, admission, "gone")
    view = await endpoints.get_endpoint(url)
    assert (view.enabled, view.disabled_reason) == (False, "answered 410 Gone")

    refused = await gate.admit(endpoint_of, people(url, 2))
    assert refused.allowed == [] and refused.deferred == {}
    assert set(refused.disabled.values()) == {"endpoint disabled: answered 410 Gone"}
    assert [v.url for v in await endpoints.list_endpoints(disabled_only=True)].count(url) == 1

    await endpoints.enable(view.id)
    back = await gate.admit(endpoint_of, people(url, 2))
    assert back.disabled == {} and len(back.allowed) + len(back.held) == 2
    assert (await recorded(url))[-2:] == ["disabled", "enabled"]


async def test_an_endpoint_failing_for_the_whole_period_is_disabled(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(endpoint_disable_after=0.5, breaker_threshold=100)
    url = new_url()
    await known_good(gate, url)
    first = await gate.admit(endpoint_of, people(url, 1))
    await settle(gate, first, "down")
    # One failure is not a disable: the endpoint is unrecorded or still enabled.
    assert not await _exists(url) or (await endpoints.get_endpoint(url)).enabled
    await asyncio.sleep(0.6)
    later = await gate.admit(endpoint_of, people(url, 1))
    await settle(gate, later, "down")
    view = await endpoints.get_endpoint(url)
    assert not view.enabled
    assert view.disabled_reason is not None
    assert view.disabled_reason.startswith("failing without a success for 0.")


async def _exists(url: str) -> bool:
    try:
        await endpoints.get_endpoint(url)
    except NotFoundError:
        return False
    return True


async def test_operators_disable_and_limits_refuse_bad_values(gate: Gate) -> None:
    url = new_url()
    view = await endpoints.disable(url, "maintenance")
    assert (view.enabled, view.disabled_reason) == (False, "maintenance")
    assert (await gate.admit(endpoint_of, people(url, 1))).disabled
    with pytest.raises(ValidationError):
        await endpoints.set_rate_limit(url, 0)
    with pytest.raises(ValidationError):
        await endpoints.set_rate_limit("ftp://x/", 5)
    with pytest.raises(ValidationError):
        await endpoints.set_host_rate_limit("a/b", 5)
    with pytest.raises(NotFoundError):
        await endpoints.enable(10**9)
    with pytest.raises(NotFoundError):
        await endpoints.enable("http://127.0.0.1:9/never-seen")


async def test_without_redis_the_gate_lets_everything_through(
    gate: Gate, tune: Callable[..., Settings]
) -> None:
    tune(broker_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    admission = await gate.admit(endpoint_of, people(new_url(), 3))
    assert len(admission.allowed) == 3
