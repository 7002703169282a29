"""Endpoint health: circuit breakers, rate limits, in-flight caps, the off switch.

An *endpoint* is what a transport dials for one subscriber (for webhooks,
the ``endpoint`` URL); many subscribers may share one. Every worker consults
the same state in Redis before sending, so an endpoint that is down costs
one probe per cool-down, not one timeout per delivery:

- **breaker**: closed; after a failure, *suspect* (one request at a time
  until a success or ``breaker_threshold`` consecutive failures); then open
  for ``breaker_cooldown`` seconds, doubled per failed probe up to
  ``breaker_cooldown_max``; then half-open: one probe, the rest wait; a
  success closes it.
- **rate limits**: deliveries per second per endpoint (its own or
  ``endpoint_rate_limit``) and per host (``host_limits``), a GCRA token
  bucket whose clock is the Redis server's, so workers on several hosts
  agree.
- **in-flight cap**: at most ``host_max_in_flight`` requests admitted to one
  host at once across all workers, held as leases that expire if a worker
  dies holding them. A caller is charged what it has open at once, not what
  it is admitted; one that finds no room may ask again (``Admission.crowded``).

What does not get through *waits*: the delivery's ``next_attempt_at`` moves
and no attempt is spent (``Admission.deferred``). An endpoint that answers
410, or fails without a success for ``endpoint_disable_after`` (5 days), is
disabled: its deliveries become dead letters saying why, until someone
enables it again (``channels endpoints enable``, the HTTP API, or
``enable()`` here). Transitions are rows in ``endpoint_events``.

The database keeps what must outlive Redis (the switch, the limits, the
history); Redis keeps what changes per request. Without Redis (a RabbitMQ
broker and no Redis beside it) only the switch applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis.exceptions import NoScriptError, RedisError
from sqlalchemy import delete, or_, select, update

from channels_core import db, shared_redis
from channels_core.errors import NotFoundError, ValidationError
from channels_core.models import EndpointEventRow, EndpointRow, HostLimitRow, utcnow
from channels_core.names import KEY_PREFIX
from channels_core.settings import get_settings

if TYPE_CHECKING:
    from channels_core.primitives import Principal
    from channels_core.transports.base import TransportResult

__all__ = [
    "Admission",
    "EndpointEvent",
    "EndpointView",
    "Gate",
    "breaker_key",
    "disable",
    "enable",
    "events",
    "get_endpoint",
    "list_endpoints",
    "set_host_rate_limit",
    "set_rate_limit",
]

log = logging.getLogger("channels.endpoints")

# Breaker states, as Redis holds them.
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# Recorded events (endpoint_events.event).
OPENED, DISABLED, ENABLED = "opened", "disabled", "enabled"
# How long a waiting delivery sleeps while another one probes or tests a suspect endpoint.
_PROBE_WAIT = 1.0
# How long one success keeps an endpoint "known good" (no canary first).
_GOOD_TTL = 300
# A booked slot outlives its time by this much, for a delivery that comes back late.
_BOOKING_GRACE = 120
# A lease on in-flight slots outlives any batch (claim_lease bounds them too).
_LEASE_MARGIN = 30.0


# The URL caches below hold a few batches' endpoints: a batch names each one
# in admit and again in settle. At 65,536 URLs each they held some 35 MB per
# pool process on a 100,000-subscriber fan-out whose URLs never come back
# (S3 peak RSS 1.13x -> 1.24x of a 10k fan-out's).
_URLS_CACHED = 4096


@lru_cache(maxsize=_URLS_CACHED)
def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


@lru_cache(maxsize=_URLS_CACHED)
def _digest(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:20]


def breaker_key(url: str) -> str:
    return f"{KEY_PREFIX}ep:{_digest(url)}"


def _good_key(url: str) -> str:
    return f"{KEY_PREFIX}ep:ok:{_digest(url)}"


@lru_cache(maxsize=_URLS_CACHED)
def _endpoint_keys(url: str) -> tuple[bytes, bytes, bytes]:
    """An endpoint's breaker, known-good and rate keys, as the scripts take them.

    A batch passes three keys per endpoint to admit and two to settle; bytes
    go to the wire as they are, where a str is encoded again each time.
    """
    return breaker_key(url).encode(), _good_key(url).encode(), _rate_key(url).encode()


def _booking_key(delivery_id: int) -> str:
    return f"{KEY_PREFIX}booking:{delivery_id}"


def _rate_key(url: str) -> str:
    return f"{KEY_PREFIX}ep:rate:{_digest(url)}"


def _host_rate_key(host: str) -> str:
    return f"{KEY_PREFIX}host:rate:{host}"


def _host_flight_keys(host: str) -> tuple[str, str]:
    return f"{KEY_PREFIX}host:flight:{host}", f"{KEY_PREFIX}host:lease:{host}"


# -- the shared state, one script per step so every worker sees it whole -------------

# KEYS: per endpoint its breaker, known-good marker and rate key; then per host
#   its rate key, flight hash and lease zset.
# ARGV: burst seconds, probe lease, lease id, lease ttl, booking horizon, number
#   of endpoints, then one string of per endpoint "n,rate,host index (from 0),";
#   the most requests the caller has open at once (0: all it is admitted);
#   then per host: rate, in-flight cap.
# Returns JSON: {now (microseconds), answers: {index: [allowed, wait_ms,
#   spread_ms, reason, event, cold, endpoint slot base and step, host slot base
#   and step (microseconds)]}} for every endpoint not simply admitted whole.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local burst_s = tonumber(ARGV[1])
local probe_lease = tonumber(ARGV[2])
local lease_id = ARGV[3]
local lease_ttl = tonumber(ARGV[4])
local hold = tonumber(ARGV[5])
local endpoints = tonumber(ARGV[6])
local per = {}
for x in string.gmatch(ARGV[7], '[^,]+') do per[#per + 1] = tonumber(x) end
local at_once = tonumber(ARGV[8])
local out = {}
local held = {}  -- host flight hash -> slots held, read once per call
local taken = {}  -- host flight hash -> {lease zset, slots this call takes}
local function fmt(x) return string.format('%.6f', x) end

local function gcra(key, rate, n)
  if rate <= 0 then return n, 0, 0, 0, 0 end
  local T = 1 / rate
  local burst = math.max(1, math.floor(burst_s * rate))
  local tau = (burst - 1) * T
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  -- Differences, not sums: at 1.8e9 seconds a double resolves only ~0.2 us,
  -- and now + tau - tat would lose a token to rounding.
  -- Slots up to ``hold`` ahead are booked, each for one delivery.
  local ahead = tat - now
  local room = 0
  if ahead <= hold + tau + 1e-6 then room = math.floor((hold + tau - ahead) / T + 1e-6) + 1 end
  return math.min(n, room), tat, T, tau, 1
end

for i = 0, endpoints - 1 do
  local bk, ok, rk = KEYS[i*3+1], KEYS[i*3+2], KEYS[i*3+3]
  local n, ep_rate, h = per[i*3+1], per[i*3+2], per[i*3+3]
  local hb = endpoints * 3 + h * 3
  local hk, fk, zk = KEYS[hb + 1], KEYS[hb + 2], KEYS[hb + 3]
  local host_rate = tonumber(ARGV[9 + h*2])
  local cap = tonumber(ARGV[10 + h*2])
  local allow, wait, reason, event, cold = n, 0, '', '', 0

  local b = redis.call('HMGET', bk, 'state', 'until', 'failures')
  local state = b[1]
  if state == 'open' or state == 'half_open' then
    local till = tonumber(b[2] or '0')
    if now < till then
      allow = 0
      if state == 'open' then wait = till - now else wait = math.min(till - now, 1) end
      reason = state
    else
      -- the cool-down is over (or the last probe's lease ran out): this caller probes
      redis.call('HSET', bk, 'state', 'half_open', 'until', fmt(now + probe_lease))
      if state == 'open' then event = 'half_open' end
      allow = math.min(allow, 1)
      wait, reason = 1, 'half_open'
    end
  elseif tonumber(b[3] or '0') > 0 then
    allow = math.min(allow, 1)
    wait, reason = 1, 'suspect'
  elseif n > 1 and redis.call('EXISTS', ok) == 0 then
    cold = 1
  end

  local ek, e_tat, e_T, e_tau, e_on = gcra(rk, ep_rate, allow)
  local hn, h_tat, h_T, h_tau, h_on = gcra(hk, host_rate, allow)
  local k = math.min(allow, ek, hn)
  if k < allow then reason = 'rate' end

  if cap > 0 and k > 0 then
    if held[fk] == nil then
      for _, gone in ipairs(redis.call('ZRANGEBYSCORE', zk, '-inf', now)) do
        redis.call('HDEL', fk, gone)
      end
      redis.call('ZREMRANGEBYSCORE', zk, '-inf', now)
      local sum = 0
      for _, v in ipairs(redis.call('HVALS', fk)) do sum = sum + tonumber(v) end
      held[fk] = sum
    end
    if taken[fk] == nil then taken[fk] = {zk, 0} end
    -- A caller with at most at_once requests open is charged at most that
    -- per host, however many it is admitted: the rest queue behind them in
    -- the caller, not at the host.
    local charge = k
    if at_once > 0 then charge = math.max(0, math.min(k, at_once - taken[fk][2])) end
    local room = math.max(0, cap - held[fk])
    if room < charge then k = room; charge = room; reason = 'in_flight' end
    held[fk] = held[fk] + charge
    taken[fk][2] = taken[fk][2] + charge
  end

  local spread = 0
  if e_on == 1 then
    local tat = e_tat + k * e_T
    redis.call('SET', rk, fmt(tat), 'PX', math.ceil((tat - now + 1) * 1000))
    if k < n then wait = math.max(wait, tat - e_tau - now - hold / 2); spread = e_T end
  end
  if h_on == 1 then
    local tat = h_tat + k * h_T
    redis.call('SET', hk, fmt(tat), 'PX', math.ceil((tat - now + 1) * 1000))
    if k < n then
      wait = math.max(wait, tat - h_tau - now - hold / 2)
      spread = math.max(spread, h_T)
    end
  end
  if reason == 'in_flight' then wait = math.max(wait, 0.2) end
  if k == n then reason = '' end
  -- Booked slot i is sent at max(base + i * step) over both limits (microseconds).
  local function us(x) return math.floor(x * 1000000) end
  -- Only what differs from "all of them, now" is answered: parsing a reply
  -- costs the worker more than this script costs the server.
  if k < n or wait > 0 or event ~= '' or cold == 1 or e_on == 1 or h_on == 1 then
    out[tostring(i)] = {
      k, math.floor(wait * 1000), math.floor(spread * 1000), reason, event, cold,
      us(e_tat - now - e_tau), us(e_T), us(h_tat - now - h_tau), us(h_T),
    }
  end
end
-- One lease per host per call, however many endpoints share the host.
for fk, z in pairs(taken) do
  if z[2] > 0 then
    redis.call('HINCRBY', fk, lease_id, z[2])
    redis.call('ZADD', z[1], fmt(now + lease_ttl), lease_id)
    redis.call('EXPIRE', fk, math.ceil(lease_ttl) + 1)
    redis.call('EXPIRE', z[1], math.ceil(lease_ttl) + 1)
  end
end
return cjson.encode({now = math.floor(now * 1000000), answers = out})
"""

# KEYS: per endpoint breaker and known-good marker, then per host the flight
#   hash and lease zset.
# ARGV: threshold, cool-down, cool-down max, ttl, lease id, known-good ttl,
#   number of endpoints, then one string of per endpoint "successes,failures,".
# Returns JSON: {index: [event, failures, seconds failing]} for endpoints that
#   changed state or are failing.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local threshold = tonumber(ARGV[1])
local cool0, cool_max, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_id, good_ttl = ARGV[5], tonumber(ARGV[6])
local endpoints = tonumber(ARGV[7])
local per = {}
for x in string.gmatch(ARGV[8], '[^,]+') do per[#per + 1] = tonumber(x) end
local out = {}
local function fmt(x) return string.format('%.6f', x) end
for i = endpoints * 2 + 1, #KEYS, 2 do
  redis.call('HDEL', KEYS[i], lease_id)
  redis.call('ZREM', KEYS[i + 1], lease_id)
end
for i = 0, endpoints - 1 do
  local bk, ok = KEYS[i*2+1], KEYS[i*2+2]
  local good, bad = per[i*2+1], per[i*2+2]
  local state = redis.call('HGET', bk, 'state') or 'closed'
  local event, failures, failing = '', 0, -1
  if good > 0 then
    if state ~= 'closed' then event = 'closed' end
    redis.call('DEL', bk)
    redis.call('SET', ok, '1', 'EX', good_ttl)
  elseif bad > 0 then
    redis.call('DEL', ok)
    failures = redis.call('HINCRBY', bk, 'failures', bad)
    redis.call('HSETNX', bk, 'since', fmt(now))
    failing = now - tonumber(redis.call('HGET', bk, 'since'))
    if state == 'half_open' then
      local cool = math.min(cool_max, tonumber(redis.call('HGET', bk, 'cool') or cool0) * 2)
      redis.call('HSET', bk, 'state', 'open', 'until', fmt(now + cool), 'cool', cool)
      event = 'opened'
    elseif state == 'closed' and failures >= threshold then
      redis.call('HSET', bk, 'state', 'open', 'until', fmt(now + cool0), 'cool', cool0)
      event = 'opened'
    end
    redis.call('EXPIRE', bk, ttl)
  end
  if event ~= '' or failures > 0 then out[tostring(i)] = {event, failures, failing} end
end
return cjson.encode(out)
"""


@lru_cache(maxsize=8)
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


async def _run(redis: Any, script: str, keys: list[str | bytes], args: list[Any]) -> Any:
    """Run a script by its SHA (the text travels once per server, not per batch)."""
    sha = _sha(script)
    try:
        return await redis.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return await redis.eval(script, len(keys), *keys, *args)


# -- the worker's side: admit before sending, settle after --------------------------------


@dataclass
class Admission:
    """What may be sent now; what waits, and how long; what may never be sent."""

    allowed: list[Principal] = field(default_factory=list)
    # subscriber id -> (seconds to wait, why)
    deferred: dict[int, tuple[float, str]] = field(default_factory=dict)
    # subscriber id -> why its endpoint is disabled
    disabled: dict[int, str] = field(default_factory=dict)
    # Held back behind a canary: a cold endpoint (no success seen lately)
    # gets one request first, the rest only if that one reaches it.
    held: list[Principal] = field(default_factory=list)
    # subscriber id -> seconds after admission its booked rate-limit slot comes
    send_at: dict[int, float] = field(default_factory=dict)
    # Deferred where a host's in-flight cap was the last limit to bind (a
    # rate limit or a suspect breaker may have bound too; asking again finds
    # out). Another batch's settle frees room within a request's time, so the
    # worker may ask again instead of sending these back to the queue.
    crowded: set[int] = field(default_factory=set)
    # Whether the script admitted any of them, so this admission's lease may
    # hold room: it must be settled even if nothing is sent now.
    charged: bool = False
    admitted_at: float = field(default_factory=time.monotonic)
    lease: str = ""
    hosts: dict[str, str] = field(default_factory=dict)  # endpoint -> host, as admitted
    by_subscriber: dict[int, str] = field(default_factory=dict)  # subscriber id -> endpoint


@dataclass
class _Config:
    loaded_at: float = -1e9
    # url -> (disabled reason or None, rate limit or None)
    endpoints: dict[str, tuple[str | None, float | None]] = field(default_factory=dict)
    hosts: dict[str, float] = field(default_factory=dict)


# Bumped by every change made in this process, so its gates reload at once;
# other processes see a change within endpoint_cache_ttl.
_generation = 0


def _changed() -> None:
    global _generation
    _generation += 1


class Gate:
    """One worker process's view of endpoint health; shared state is in Redis."""

    def __init__(self) -> None:
        self._config = _Config()
        self._generation = _generation

    def forget(self) -> None:
        """Drop the cached switches and limits."""
        self._config = _Config()

    async def _load(self) -> _Config:
        settings = get_settings()
        fresh = time.monotonic() - self._config.loaded_at < settings.endpoint_cache_ttl
        if fresh and self._generation == _generation:
            return self._config
        self._generation = _generation
        async with db.session() as s:
            rows = await s.execute(
                select(EndpointRow.url, EndpointRow.disabled_reason, EndpointRow.rate_limit).where(
                    or_(EndpointRow.disabled_at.is_not(None), EndpointRow.rate_limit.is_not(None))
                )
            )
            endpoints = {url: (reason, rate) for url, reason, rate in rows}
            limits = await s.execute(select(HostLimitRow.host, HostLimitRow.rate_limit))
            hosts = dict(limits.all())
        self._config = _Config(time.monotonic(), endpoints, hosts)  # type: ignore[arg-type]
        return self._config

    async def admit(
        self, endpoint_of: Any, recipients: Sequence[Principal], at_once: int = 0
    ) -> Admission:
        """Split ``recipients`` into those sent now, those that wait, and the disabled.

        ``at_once`` is the most requests the caller opens at once (0: one per
        recipient); a host's in-flight cap charges the caller no more.
        """
        settings = get_settings()
        admission = Admission(lease=uuid.uuid4().hex)
        dialled: list[tuple[Principal, str]] = []
        for principal in recipients:
            url = endpoint_of(principal)
            if url:
                dialled.append((principal, url))
            else:  # no endpoint: nothing to guard (the transport reports a missing one)
                admission.allowed.append(principal)
        if not dialled:
            return admission
        config = await self._load()
        groups: dict[str, list[Principal]] = {}
        for principal, url in dialled:
            assert principal.id is not None
            reason, _ = config.endpoints.get(url, (None, None))
            if reason is not None:
                admission.disabled[principal.id] = f"endpoint disabled: {reason}"
                continue
            admission.by_subscriber[principal.id] = url
            groups.setdefault(url, []).append(principal)
        if not groups:
            return admission
        redis = shared_redis.client()
        if redis is None:
            for members in groups.values():
                admission.allowed.extend(members)
            return admission
        for url in groups:
            admission.hosts[url] = host_of(url)
        try:
            if any(self._limited(config, url) for url in groups):
                await self._honour_bookings(redis, groups, admission)
                # Sent at booked slots, a batch is several sends at once
                # (delivery._send_paced): charge every request it is admitted.
                at_once = 0
            urls = [url for url, members in groups.items() if members]
            answers = (
                await self._admit(redis, config, urls, groups, admission, at_once) if urls else ""
            )
        except (RedisError, OSError) as exc:
            # Health is a courtesy to endpoints; it must never stall delivery.
            log.warning("endpoint health unavailable, sending unchecked: %s", exc)
            for members in groups.values():
                admission.allowed.extend(members)
            return admission
        bookings: dict[str, float] = {}
        reply: dict[str, Any] = json.loads(answers) if urls else {"now": 0, "answers": {}}
        now = reply["now"] / 1e6
        for index, url in enumerate(urls):
            members = groups[url]
            answer = reply["answers"].get(str(index))
            if answer is None:  # all of them, now
                admission.allowed.extend(members)
                admission.charged = True
                continue
            allowed, wait_ms, spread_ms, reason, event, cold = answer[:6]
            admission.charged = admission.charged or int(allowed) > 0
            e_base, e_step, h_base, h_step = (x / 1e6 for x in answer[6:])
            for i, principal in enumerate(members[: int(allowed)]):
                assert principal.id is not None and principal.delivery_id is not None
                offset = max(e_base + i * e_step, h_base + i * h_step, 0.0)
                if offset > settings.rate_limit_hold:
                    # A slot booked for later: wait in the queue, not in this process.
                    admission.deferred[principal.id] = (offset, f"booked slot of {url}")
                    bookings[_booking_key(principal.delivery_id)] = now + offset
                    continue
                if offset > 0.001:
                    admission.send_at[principal.id] = offset
                if cold and i > 0:
                    admission.held.append(principal)
                else:
                    admission.allowed.append(principal)
            for j, principal in enumerate(members[int(allowed) :]):
                assert principal.id is not None
                wait = int(wait_ms) / 1000 + j * int(spread_ms) / 1000
                admission.deferred[principal.id] = (max(wait, 0.01), _why(reason, url))
                if reason == "in_flight":
                    admission.crowded.add(principal.id)
            if event:
                await _record(url, event, "cool-down over: one probe goes through")
        if bookings:
            pipe = redis.pipeline(transaction=False)
            for key, slot in bookings.items():
                pipe.set(key, f"{slot:.6f}", ex=int(slot - now) + _BOOKING_GRACE)
            await pipe.execute()
        return admission

    def _limited(self, config: _Config, url: str) -> bool:
        own = config.endpoints.get(url, (None, None))[1]
        rate = own if own is not None else get_settings().endpoint_rate_limit
        return rate > 0 or config.hosts.get(host_of(url), 0) > 0

    async def _honour_bookings(
        self, redis: Any, groups: dict[str, list[Principal]], admission: Admission
    ) -> None:
        """Admit deliveries coming back for a slot booked earlier, without a new token."""
        hold = get_settings().rate_limit_hold
        members = [(url, p) for url, ps in groups.items() for p in ps if p.delivery_id]
        if not members:
            return
        pipe = redis.pipeline(transaction=False)
        pipe.time()
        pipe.mget([_booking_key(p.delivery_id) for _, p in members])  # type: ignore[arg-type]
        (seconds, micros), slots = await pipe.execute()
        now = int(seconds) + int(micros) / 1e6
        used: list[str] = []
        for (url, principal), slot in zip(members, slots, strict=True):
            if slot is None:
                continue
            assert principal.id is not None and principal.delivery_id is not None
            offset = float(slot) - now
            # Back late (a busy worker): it still goes now. Booking afresh
            # would waste its slot, and under load every slot, so the rate
            # holds over any window longer than the lateness.
            groups[url].remove(principal)
            if offset > hold:  # back early (a sweep): keep the booking, wait again
                admission.deferred[principal.id] = (offset, f"booked slot of {url}")
                continue
            admission.allowed.append(principal)
            if offset > 0.001:
                admission.send_at[principal.id] = offset
            used.append(_booking_key(principal.delivery_id))
        if used:
            await redis.delete(*used)

    async def _admit(
        self,
        redis: Any,
        config: _Config,
        urls: list[str],
        groups: dict[str, list[Principal]],
        admission: Admission,
        at_once: int,
    ) -> str:
        settings = get_settings()
        keys: list[str | bytes] = []
        args: list[Any] = [
            settings.rate_limit_burst,
            settings.http_deadline + 5,
            admission.lease,
            settings.claim_lease + _LEASE_MARGIN,
            settings.rate_limit_book_ahead,
        ]
        hosts: dict[str, int] = {}
        per: list[str] = []
        default_rate = repr(settings.endpoint_rate_limit)
        for url in urls:
            host = hosts.setdefault(admission.hosts[url], len(hosts))
            keys += _endpoint_keys(url)
            own = config.endpoints.get(url, (None, None))[1]
            rate = repr(own) if own is not None else default_rate
            per.append(f"{len(groups[url])},{rate},{host},")
        args += [len(urls), "".join(per), at_once]
        for host_name in hosts:  # in index order
            keys += [_host_rate_key(host_name), *_host_flight_keys(host_name)]
            args += [config.hosts.get(host_name, 0), settings.host_max_in_flight]
        return str(await _run(redis, _ADMIT, keys, args))

    async def settle(self, admission: Admission, results: Sequence[TransportResult]) -> None:
        """Feed outcomes to the breakers; disable endpoints that earned it."""
        if not admission.hosts:
            return
        settings = get_settings()
        tally: dict[str, list[int]] = {url: [0, 0] for url in admission.hosts}
        gone: set[str] = set()
        for result in results:
            url = admission.by_subscriber.get(result.subscriber_id or 0)
            if url is None or url not in tally:
                continue
            if result.status_code == 410:
                gone.add(url)
            if reached(result):
                tally[url][0] += 1
            elif not result.permanent:
                tally[url][1] += 1
        redis = shared_redis.client()
        urls = list(tally)
        answers: dict[str, list[Any]] = {}
        if redis is not None:
            keys: list[str | bytes] = []
            args: list[Any] = [
                settings.breaker_threshold,
                settings.breaker_cooldown,
                settings.breaker_cooldown_max,
                int(settings.endpoint_disable_after + 86400),
                admission.lease,
            ]
            args += [_GOOD_TTL, len(urls)]
            args.append("".join([f"{tally[url][0]},{tally[url][1]}," for url in urls]))
            for url in urls:
                keys += _endpoint_keys(url)[:2]
            for host in sorted(set(admission.hosts.values())):
                keys += _host_flight_keys(host)
            try:
                answers = json.loads(await _run(redis, _SETTLE, keys, args))
            except (RedisError, OSError) as exc:
                log.warning("endpoint health unavailable, outcomes not recorded: %s", exc)
        for index, url in enumerate(urls):
            event, failures, failing = answers.get(str(index), ("", 0, -1))
            if url in gone:
                await disable(url, "answered 410 Gone")
                continue
            if event == "opened":
                await _record(url, OPENED, f"{failures} consecutive failures")
            elif event == "closed":
                await _record(url, CLOSED, "a request succeeded")
            if float(failing) >= settings.endpoint_disable_after:
                await disable(url, f"failing without a success for {_duration(float(failing))}")


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.1f} seconds"


def reached(result: TransportResult) -> bool:
    """Whether the endpoint answered: any answer means it is up, a 4xx included;
    only transient failures (no answer, 5xx, 429) count against it."""
    return result.success or (result.permanent and result.status_code is not None)


def _why(reason: str, url: str) -> str:
    return {
        "open": f"circuit open for {url}",
        "half_open": f"waiting for the probe of {url}",
        "suspect": f"waiting while {url} is tested after a failure",
        "rate": f"rate limit of {url}",
        "in_flight": f"in-flight cap of host {host_of(url)}",
    }.get(reason, reason)


# -- the recorded side: rows, events and the switch -----------------------------------------


@dataclass
class EndpointEvent:
    event: str
    reason: str | None
    at: datetime


@dataclass
class EndpointView:
    id: int
    url: str
    host: str
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    rate_limit: float | None
    breaker: str = CLOSED
    failures: int = 0
    open_for: float | None = None
    last_event: EndpointEvent | None = None


def _check_url(url: str) -> str:
    from channels_core.validation import check_endpoint_url

    url = url.strip()
    check_endpoint_url(url)
    return url


async def _row_id(url: str) -> int:
    """The endpoint's id, creating its row on first need (two workers agree on one)."""
    async with db.session() as s, s.begin():
        found = await s.scalar(select(EndpointRow.id).where(EndpointRow.url == url))
        if found is not None:
            return int(found)
        await s.execute(
            db.insert(s, EndpointRow)
            .values(url=url, host=host_of(url), created_at=utcnow(), updated_at=utcnow())
            .on_conflict_do_nothing()
        )
        return int(await s.scalar(select(EndpointRow.id).where(EndpointRow.url == url)))  # type: ignore[arg-type]


async def _record(url: str, event: str, reason: str | None) -> None:
    endpoint_id = await _row_id(url)
    async with db.session() as s, s.begin():
        s.add(EndpointEventRow(endpoint_id=endpoint_id, event=event, reason=reason, at=utcnow()))
    log.info("endpoint %s %s: %s", url, event, reason, extra={"endpoint": url, "event": event})


async def _resolve(ident: int | str) -> EndpointRow:
    async with db.session() as s:
        if isinstance(ident, int) and not isinstance(ident, bool):
            row = await s.get(EndpointRow, ident)
        elif isinstance(ident, str) and ident.strip().isdigit():
            row = await s.get(EndpointRow, int(ident.strip()))
        elif isinstance(ident, str):
            row = await s.scalar(select(EndpointRow).where(EndpointRow.url == ident.strip()))
        else:
            raise ValidationError(f"an endpoint is named by its id or URL, not {ident!r}")
    if row is None:
        raise NotFoundError("endpoint", ident)
    return row


async def disable(ident: int | str, reason: str) -> EndpointView:
    """Switch an endpoint off: its deliveries become dead letters saying ``reason``."""
    if isinstance(ident, str) and not ident.strip().isdigit():
        url = _check_url(ident)
        await _row_id(url)
        ident = url
    row = await _resolve(ident)
    reason = reason.strip() or "disabled by an operator"
    async with db.session() as s, s.begin():
        changed = await s.execute(
            update(EndpointRow)
            .where(EndpointRow.id == row.id, EndpointRow.disabled_at.is_(None))
            .values(disabled_at=utcnow(), disabled_reason=reason, updated_at=utcnow())
        )
    if changed.rowcount:  # type: ignore[attr-defined]
        await _record(row.url, DISABLED, reason)
        log.warning("endpoint %s disabled: %s", row.url, reason, extra={"endpoint": row.url})
    _changed()
    return await get_endpoint(row.id)


async def enable(ident: int | str) -> EndpointView:
    """Switch an endpoint back on, with a closed breaker and a clean failure record.

    Its dead letters stay dead; ``channels retry`` or ``replay`` sends them again.
    """
    row = await _resolve(ident)
    async with db.session() as s, s.begin():
        changed = await s.execute(
            update(EndpointRow)
            .where(EndpointRow.id == row.id, EndpointRow.disabled_at.is_not(None))
            .values(disabled_at=None, disabled_reason=None, updated_at=utcnow())
        )
    redis = shared_redis.client()
    if redis is not None:
        await redis.delete(breaker_key(row.url))
    if changed.rowcount:  # type: ignore[attr-defined]
        await _record(row.url, ENABLED, "enabled by an operator")
    _changed()
    return await get_endpoint(row.id)


async def set_rate_limit(url: str, rate: float | None) -> EndpointView:
    """Limit one endpoint to ``rate`` deliveries a second (``None`` for the default)."""
    url = _check_url(url)
    if rate is not None and not rate > 0:
        raise ValidationError(f"a rate limit is a positive number of deliveries a second: {rate}")
    endpoint_id = await _row_id(url)
    async with db.session() as s, s.begin():
        await s.execute(
            update(EndpointRow)
            .where(EndpointRow.id == endpoint_id)
            .values(rate_limit=rate, updated_at=utcnow())
        )
    _changed()
    return await get_endpoint(endpoint_id)


async def set_host_rate_limit(host: str, rate: float | None) -> None:
    """Limit every endpoint on ``host`` together (``None`` removes the limit)."""
    host = host.strip().lower()
    if not host or any(c in host for c in "/:@ \r\n\t"):
        raise ValidationError(f"a host is a bare name or address, not {host!r}")
    if rate is not None and not rate > 0:
        raise ValidationError(f"a rate limit is a positive number of deliveries a second: {rate}")
    async with db.session() as s, s.begin():
        if rate is None:
            await s.execute(delete(HostLimitRow).where(HostLimitRow.host == host))
        else:
            stmt = db.insert(s, HostLimitRow).values(
                host=host, rate_limit=rate, updated_at=utcnow()
            )
            await s.execute(
                stmt.on_conflict_do_update(
                    index_elements=["host"],
                    set_={"rate_limit": rate, "updated_at": utcnow()},
                )
            )
    _changed()


async def host_rate_limits() -> dict[str, float]:
    async with db.session() as s:
        return dict((await s.execute(select(HostLimitRow.host, HostLimitRow.rate_limit))).all())  # type: ignore[arg-type]


async def _views(rows: Sequence[EndpointRow]) -> list[EndpointView]:
    views = [
        EndpointView(
            id=row.id,
            url=row.url,
            host=row.host,
            enabled=row.disabled_at is None,
            disabled_reason=row.disabled_reason,
            disabled_at=row.disabled_at,
            rate_limit=row.rate_limit,
        )
        for row in rows
    ]
    if not views:
        return views
    async with db.session() as s:
        latest = (
            select(EndpointEventRow.endpoint_id, EndpointEventRow.id)
            .where(EndpointEventRow.endpoint_id.in_([v.id for v in views]))
            .order_by(EndpointEventRow.endpoint_id, EndpointEventRow.id.desc())
        )
        last_ids: dict[int, int] = {}
        for endpoint_id, event_id in await s.execute(latest):
            last_ids.setdefault(endpoint_id, event_id)
        found = {
            e.endpoint_id: EndpointEvent(e.event, e.reason, e.at)
            for e in await s.scalars(
                select(EndpointEventRow).where(EndpointEventRow.id.in_(list(last_ids.values())))
            )
        }
    redis = shared_redis.client()
    states: list[Any] = []
    if redis is not None:
        try:
            pipe = redis.pipeline(transaction=False)
            for view in views:
                pipe.hgetall(breaker_key(view.url))
            states = await pipe.execute()
            now = float((await redis.time())[0])
        except (RedisError, OSError) as exc:
            log.warning("breaker states unavailable: %s", exc)
            states = []
    for i, view in enumerate(views):
        view.last_event = found.get(view.id)
        state = states[i] if i < len(states) else {}
        if state:
            view.breaker = state.get("state", CLOSED)
            view.failures = int(state.get("failures", 0))
            if view.breaker == OPEN:
                view.open_for = max(0.0, float(state.get("until", 0)) - now)
    return views


async def list_endpoints(*, disabled_only: bool = False) -> list[EndpointView]:
    async with db.session() as s:
        query = select(EndpointRow).order_by(EndpointRow.id)
        if disabled_only:
            query = query.where(EndpointRow.disabled_at.is_not(None))
        rows = list(await s.scalars(query))
    return await _views(rows)


async def get_endpoint(ident: int | str) -> EndpointView:
    return (await _views([await _resolve(ident)]))[0]


async def events(ident: int | str, *, limit: int = 100) -> list[EndpointEvent]:
    """An endpoint's recorded transitions, newest first."""
    row = await _resolve(ident)
    async with db.session() as s:
        found = await s.scalars(
            select(EndpointEventRow)
            .where(EndpointEventRow.endpoint_id == row.id)
            .order_by(EndpointEventRow.id.desc())
            .limit(limit)
        )
        return [EndpointEvent(e.event, e.reason, e.at) for e in found]


# One per process: the cache of switches and limits is per process by design.
_gate = Gate()


def gate() -> Gate:
    return _gate
