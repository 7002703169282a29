"""The scenarios: one fault each, on real processes, then the ledgers.

Each function gets a ``World`` whose SMTP server and scene are open, builds
its subscribers, sends, injects its fault mid-flight, lets the system settle
and returns the reconciled ``Result`` plus its own checks (``failures``).
Sizes: at least 2,000 deliveries each in the full run, a few hundred quick.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

import chaos.plugins  # noqa: F401  (registers chaos-poison here too: channels name it)
from channels_core import embedded
from chaos.ledger import Result, unsettled
from chaos.proxy import ResetProxy
from chaos.receivers import HttpSink
from chaos.world import Subscribers, World

__all__ = ["Scenario", "SCENARIOS"]


@dataclass
class Scenario:
    name: str
    run: Callable[[World], Result]
    tuning: dict[str, str] = field(default_factory=dict)
    smtp_busy: int = 0
    # Works on the run's shared worker and beat (default tuning and env): its
    # fault leaves them standing, or it hands over the worker it replaced.
    shared: bool = False


def size(w: World) -> int:
    return 200 if w.quick else 2000


def settle_timeout(w: World) -> float:
    return 45.0 if w.quick else 180.0


def http_channel(
    w: World, sink: HttpSink, modes: list[str], transport: str = "http"
) -> Subscribers:
    paths = [f"/{mode}/{i}" for i, mode in enumerate(modes)]
    return w.channel(transport, [{"endpoint": sink.url(p)} for p in paths], paths)


def pool_children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


def finish(w: World, fault_at: float) -> Result:
    settle_s = w.settle(fault_at, settle_timeout(w))
    return w.reconcile(settle_s)


def check_alive(result: Result, *processes: object) -> None:
    for process in processes:
        if not process.alive():  # type: ignore[attr-defined]
            result.failures.append(f"{process.name} died")  # type: ignore[attr-defined]


# 1 -----------------------------------------------------------------------------------


def pool_child_killed(w: World) -> Result:
    sink = w.http(hold=0.02)
    w.author()
    http_channel(w, sink, ["ok"] * size(w))
    worker, beat = w.processes()
    w.send()
    w.wait_delivered(0.15)
    children = pool_children(worker.pid)
    if not children:
        raise RuntimeError("the worker has no pool children to kill")
    children[0].send_signal(signal.SIGKILL)
    fault_at = time.monotonic()
    result = finish(w, fault_at)
    result.notes.append(f"killed pool child {children[0].pid}")
    check_alive(result, worker, beat)
    return result


# 2 -----------------------------------------------------------------------------------


def mixed_channels(w: World, sink: HttpSink) -> None:
    n = size(w)
    queues = ["chaos.q.0", "chaos.q.1", "chaos.q.2"]
    w.queue(queues)
    http_channel(w, sink, ["ok"] * (n * 6 // 10))
    emails = [f"ok-{i}@example.com" for i in range(n * 2 // 10)]
    w.channel("email", [{"email": e} for e in emails], emails)
    rest = n - n * 6 // 10 - n * 2 // 10
    w.channel("queue", [{"queue": queues[i % 3]} for i in range(rest)], [])


def worker_killed(w: World) -> Result:
    sink = w.http(hold=0.01)
    w.author()
    mixed_channels(w, sink)
    worker, beat = w.processes()
    w.send()
    at_kill = w.wait_delivered(0.15)
    worker.kill(signal.SIGKILL)  # the main process and its pool children at once
    worker.popen.wait(10)
    fault_at = time.monotonic()
    new = w.replacement_worker("worker-after-kill")
    result = finish(w, fault_at)
    result.notes.append(f"killed at {at_kill}/{len(w.accepted.pairs)} delivered")
    check_alive(result, new, beat)
    return result


# 3 -----------------------------------------------------------------------------------

_RECEIVED = re.compile(r"Task channels\.deliver_batch\[([0-9a-f-]+)\] received")
_SUCCEEDED = re.compile(r"Task channels\.deliver_batch\[([0-9a-f-]+)\] succeeded")
_CLAIMED = re.compile(
    r"Task channels\.deliver_batch\[([0-9a-f-]+)\] succeeded in [0-9.e-]+s: \{'claimed': (\d+)"
)


def warm_shutdown(w: World) -> Result:
    sink = w.http(hold=0.05)
    w.author()
    http_channel(w, sink, ["ok"] * size(w))
    first, beat = w.processes()
    # A shared worker's log holds earlier scenarios' tasks: read from here on.
    offset = len(first.log())
    w.send()
    w.wait_delivered(0.15)
    os.kill(first.pid, signal.SIGTERM)  # the main process only: Celery's warm shutdown
    fault_at = time.monotonic()
    log_at_term = first.log()[offset:]
    try:
        code = first.popen.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    second = w.replacement_worker("worker-after-term")
    result = finish(w, fault_at)
    held = set(_RECEIVED.findall(log_at_term)) - set(_SUCCEEDED.findall(log_at_term))
    log_a = first.log()[offset:]
    received_a = set(_RECEIVED.findall(log_a))
    unfinished = received_a - set(_SUCCEEDED.findall(log_a))
    redelivered = received_a & set(_RECEIVED.findall(second.log()))
    result.notes.append(
        f"at SIGTERM the worker held {len(held)} tasks; {len(held - unfinished)} finished "
        f"during the warm shutdown, {len(unfinished)} were handed back; "
        f"{len(redelivered)} redelivered to the next worker"
    )
    if code != 0:
        result.failures.append(f"warm shutdown did not exit cleanly (exit {code})")
    if unfinished - redelivered:
        result.failures.append(
            f"{len(unfinished - redelivered)} unfinished tasks were not redelivered: "
            f"{sorted(unfinished - redelivered)[:5]}"
        )
    # A task that finished during the shutdown can come back too: kombu's Redis
    # transport hands back the unacknowledged messages as the worker closes its
    # connection, and an ack still on its way is among them. Harmless only if
    # the next worker finds every one of its deliveries final and claims none.
    again = redelivered - unfinished
    claimed = {task: int(n) for task, n in _CLAIMED.findall(second.log())}
    harmful = sorted(task for task in again if claimed.get(task) != 0)
    if harmful:
        result.failures.append(
            f"{len(harmful)} tasks finished before the shutdown were redelivered and did "
            f"not find all their deliveries final: {harmful[:5]}"
        )
    elif again:
        result.notes.append(f"{len(again)} finished tasks redelivered; each claimed nothing")
    check_alive(result, second, beat)
    return result


# 4 -----------------------------------------------------------------------------------


def broker_restarted(w: World) -> Result:
    sink = w.http(hold=0.01)
    w.author()
    mixed_channels(w, sink)
    worker, beat = w.processes()
    w.send()
    at = w.wait_delivered(0.15)
    [before] = embedded.stop(names=("valkey",))
    fault_at = time.monotonic()
    time.sleep(1.0)
    after = embedded.ensure_valkey()  # persistence off: every queue is empty now
    result = finish(w, fault_at)
    result.notes.append(f"Valkey restarted empty at {at}/{len(w.accepted.pairs)} delivered")
    if after.port != before.port:
        result.failures.append("Valkey came back on another port")
    check_alive(result, worker, beat)
    return result


# 5 -----------------------------------------------------------------------------------


def producer_killed(w: World) -> Result:
    sink = w.http(hold=0.0)
    author = w.author()
    messages = 2 if w.quick else 4
    subs = http_channel(w, sink, ["ok"] * (size(w) // messages))
    worker, beat = w.processes()
    env = {**os.environ, **w.scene.env, "CHANNELS_DISPATCHER": "chaos.faults:DieBeforeEnqueue"}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos.produce", str(subs.channel_id), str(author), str(messages)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    fault_at = time.monotonic()
    # Accepted is what committed: the producer died before it could say so.
    with w.chaos.admin() as conn:
        rows = conn.execute(
            "SELECT message_id FROM outbox WHERE channel_id = %s", (subs.channel_id,)
        ).fetchall()
    w.accept([int(r[0]) for r in rows])
    result = finish(w, fault_at)
    if proc.returncode != -signal.SIGKILL:
        result.failures.append(
            f"the producer was not killed before enqueueing (exit {proc.returncode}): "
            f"{proc.stderr[-300:]}"
        )
    if len(rows) != messages:
        result.failures.append(f"{len(rows)} of {messages} messages committed")
    with w.chaos.admin() as conn:
        relayed = conn.execute(
            "SELECT count(*) FROM outbox WHERE channel_id = %s AND relays >= 1 "
            "AND routed_at IS NOT NULL",
            (subs.channel_id,),
        ).fetchone()
    result.notes.append(f"{relayed[0] if relayed else 0}/{len(rows)} outbox entries relayed")
    check_alive(result, worker, beat)
    return result


# 6 -----------------------------------------------------------------------------------


def database_restarted(w: World) -> Result:
    sink = w.http(hold=0.02)
    w.author()
    http_channel(w, sink, ["ok"] * size(w))
    worker, beat = w.processes()
    w.send()
    at = w.wait_delivered(0.15)
    [before] = embedded.stop(names=("postgres",))
    fault_at = time.monotonic()
    time.sleep(1.0 if w.quick else 2.0)
    after = embedded.ensure_postgres()
    result = finish(w, fault_at)
    result.notes.append(f"PostgreSQL restarted at {at}/{len(w.accepted.pairs)} delivered")
    if after.port != before.port:
        result.failures.append("PostgreSQL came back on another port")
    check_alive(result, worker, beat)
    return result


# 7 -----------------------------------------------------------------------------------


def broker_connection_cut(w: World) -> Result:
    port = int(w.chaos.broker_url.rsplit(":", 1)[1].split("/")[0])
    proxy = ResetProxy(port).start()
    w.scene.cleanups.append(proxy.stop)
    via = {"CHANNELS_BROKER_URL": proxy.url()}  # the fault is the broker's connections
    sink = w.http(hold=0.05)  # held long enough that overlapping copies would show
    w.author()
    http_channel(w, sink, ["ok"] * size(w))
    worker, beat = w.processes(env=via)
    w.send()
    w.wait_delivered(0.15)
    window = 2.0 if w.quick else 3.0
    cut = proxy.cut(window)
    fault_at = time.monotonic()
    w.wait_delivered(0.5, timeout=settle_timeout(w))
    cut += proxy.cut(window)
    result = finish(w, fault_at)
    result.notes.append(f"reset {cut} broker connections in two cuts")
    if sink.overlaps:
        result.failures.append(
            f"{len(sink.overlaps)} deliveries ran twice in parallel: "
            f"{sorted(set(sink.overlaps))[:5]}"
        )
    check_alive(result, worker, beat)
    return result


# 8 -----------------------------------------------------------------------------------


def retry_beyond_visibility(w: World) -> Result:
    sink = w.http(fail_first=1)
    w.author()
    http_channel(w, sink, ["flaky"] * size(w))
    worker, beat = w.processes()
    fault_at = time.monotonic()
    w.send()
    result = finish(w, fault_at)
    tries = Counter(r.delivery_id for r in sink.snapshot())
    extra = sum(c - 2 for c in tries.values() if c > 2)
    if extra:
        result.failures.append(f"{extra} tries beyond the two scheduled (broker redelivery)")
    gaps = [times[1] - times[0] for times in sink.arrivals.values() if len(times) >= 2]
    early = sum(1 for g in gaps if g < 8.0)
    result.notes.append(
        f"retry gap min {min(gaps, default=0):.1f}s (scheduled 9s, visibility timeout 6s)"
    )
    if early:
        result.failures.append(f"{early} retries came before their due time")
    check_alive(result, worker, beat)
    return result


# 9 -----------------------------------------------------------------------------------


def poison_task(w: World) -> Result:
    sink = w.http(hold=0.0)
    w.author()
    kill_log = w.chaos.poison_log  # in every worker's env
    kill_log.unlink(missing_ok=True)
    n = size(w)
    modes = ["ok"] * n
    paths = [f"/{mode}/{i}" for i, mode in enumerate(modes)]
    aliases = [{"endpoint": sink.url(p)} for p in paths]
    poison = n // 3  # somewhere inside a batch, not at its edge
    aliases[poison]["chaos_poison"] = "kill"
    w.channel("chaos-poison", aliases, paths)
    worker, beat = w.processes()
    fault_at = time.monotonic()
    w.send()
    limit = 40  # kills: far past any sane bound, so the scenario ends either way

    def kills() -> int:
        return len(kill_log.read_text().splitlines()) if kill_log.exists() else 0

    deadline = time.monotonic() + settle_timeout(w)
    while time.monotonic() < deadline and kills() < limit:
        if w.final_count("delivered") + w.final_count("dead") >= len(w.accepted.pairs):
            break
        time.sleep(0.2)
    settle_s = time.monotonic() - fault_at
    result = w.reconcile(settle_s)
    count = kills()
    result.notes.append(f"the poison delivery killed its worker {count} times")
    if count >= limit:
        result.failures.append(
            f"redeliveries unbounded: {count} worker kills and counting (stopped by the scenario)"
        )
    with w.chaos.admin() as conn:
        row = conn.execute(
            "SELECT status, last_error FROM deliveries WHERE subscriber_id = %s",
            (w.channels[0].ids[poison],),
        ).fetchone()
    if row is None or row[0] != "dead" or not row[1]:
        result.failures.append(f"the poison delivery is not dead with a reason: {row}")
    else:
        result.notes.append(f"poison delivery dead: {row[1][:80]}")
    check_alive(result, worker, beat)
    return result


# 10 ----------------------------------------------------------------------------------

HOSTILE = {
    # behaviour: (share in percent, final status expected)
    "ok": (40, "delivered"),
    "slow": (10, "delivered"),
    "stall": (5, "dead"),
    "drip": (5, "dead"),
    "redirect": (10, "dead"),
    "gone": (10, "dead"),
    "limit": (10, "delivered"),
    "reset": (10, "delivered"),
}


def _foreign_connections(pids: list[int]) -> set[str]:
    """Remote addresses outside loopback that these processes hold sockets to."""
    seen: set[str] = set()
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            for conn in conns:
                if conn.raddr and not str(conn.raddr.ip).startswith(("127.", "::1", "::ffff:127.")):
                    seen.add(f"{conn.raddr.ip}:{conn.raddr.port}")
    return seen


def hostile_endpoints(w: World) -> Result:
    elsewhere = HttpSink().start()  # the redirect target: must see nothing
    w.scene.cleanups.append(elsewhere.stop)
    sink = w.http(redirect_to=elsewhere.base_url, fail_first=1)
    w.author()
    n = size(w)
    # Interleaved, so every batch holds every kind of endpoint.
    wheel = [mode for mode, (share, _) in HOSTILE.items() for _ in range(share)]
    modes = [wheel[(i * 37) % len(wheel)] for i in range(n)]
    subs = http_channel(w, sink, modes)
    worker, beat = w.processes()
    fault_at = time.monotonic()
    w.send()
    foreign: set[str] = set()
    deadline = time.monotonic() + settle_timeout(w)
    while time.monotonic() < deadline:
        foreign |= _foreign_connections([worker.pid, beat.pid])
        if unsettled(w.chaos, w.accepted) == 0:
            break
        time.sleep(0.3)
    result = w.reconcile(time.monotonic() - fault_at)
    if elsewhere.requests():
        result.failures.append(f"the redirect target received {elsewhere.requests()} requests")
    if foreign:
        result.failures.append(f"dialled outside loopback: {sorted(foreign)[:5]}")
    with w.chaos.admin() as conn:
        rows = conn.execute(
            "SELECT subscriber_id, status FROM deliveries WHERE message_id = ANY(%s)",
            (w.accepted.message_ids,),
        ).fetchall()
    mode_of = {sid: modes[i] for i, sid in enumerate(subs.ids)}
    wrong = Counter(
        f"{mode_of[sid]}->{status}" for sid, status in rows if HOSTILE[mode_of[sid]][1] != status
    )
    if wrong:
        result.failures.append(f"unexpected outcomes: {dict(wrong)}")
    limited = [times for times in _arrivals_by_mode(sink, "limit").values() if len(times) >= 2]
    early = sum(1 for times in limited if times[1] - times[0] < 0.9)
    result.notes.append(f"{len(limited)} 429s retried; {early} before Retry-After")
    if early:
        result.failures.append(f"{early} retries ignored Retry-After")
    check_alive(result, worker, beat)
    return result


def _arrivals_by_mode(sink: HttpSink, mode: str) -> dict[str, list[float]]:
    ids = {
        f"dlv_{r.delivery_id}" for r in sink.snapshot() if r.subscriber_key.startswith(f"/{mode}/")
    }
    return {wid: times for wid, times in sink.arrivals.items() if wid in ids}


# 11 ----------------------------------------------------------------------------------

SMTP_KINDS = {
    "ok": (50, "delivered"),
    "grey": (25, "delivered"),
    "reject": (15, "dead"),
    "drop": (10, "delivered"),
}


def faulty_smtp(w: World) -> Result:
    assert w.smtp is not None
    w.author()
    n = size(w)
    wheel = [kind for kind, (share, _) in SMTP_KINDS.items() for _ in range(share)]
    kinds = [wheel[(i * 37) % len(wheel)] for i in range(n)]
    emails = [f"{kind}-{i}@example.com" for i, kind in enumerate(kinds)]
    subs = w.channel("email", [{"email": e} for e in emails], emails)
    worker, beat = w.processes()
    fault_at = time.monotonic()
    w.send()
    result = finish(w, fault_at)
    with w.chaos.admin() as conn:
        rows = conn.execute(
            "SELECT subscriber_id, status, last_error FROM deliveries WHERE message_id = ANY(%s)",
            (w.accepted.message_ids,),
        ).fetchall()
    kind_of = {sid: kinds[i] for i, sid in enumerate(subs.ids)}
    wrong = Counter(
        f"{kind_of[sid]}->{status}: {(error or '')[:60]}"
        for sid, status, error in rows
        if SMTP_KINDS[kind_of[sid]][1] != status
    )
    if wrong:
        result.failures.append(f"unexpected outcomes: {dict(wrong.most_common(4))}")
    result.notes.append(f"SMTP connections: {w.smtp.connections} ({w.smtp.busy_first} got 421)")
    check_alive(result, worker, beat)
    return result


# 12 ----------------------------------------------------------------------------------


def partitioned_host(w: World) -> Result:
    from chaos.netns import partitioned_host as run

    return run(w)


SCENARIOS: list[Scenario] = [
    Scenario("pool_child_sigkill", pool_child_killed, shared=True),
    Scenario("worker_sigkill", worker_killed, shared=True),
    Scenario("warm_shutdown", warm_shutdown, shared=True),
    Scenario("broker_restart", broker_restarted, shared=True),
    Scenario("producer_killed", producer_killed, shared=True),
    Scenario("postgres_restart", database_restarted, shared=True),
    Scenario("broker_conn_reset", broker_connection_cut),
    Scenario(
        "retry_past_visibility",
        retry_beyond_visibility,
        # A retry due at 9 s, past a 6 s visibility timeout; countdowns stay below it.
        tuning={"visibility_timeout": "6", "countdown_max": "3", "retry_schedule": "0,9"},
    ),
    Scenario("poison_task", poison_task, shared=True),
    Scenario("hostile_http", hostile_endpoints, shared=True),
    Scenario(
        "faulty_smtp",
        faulty_smtp,
        # The default schedule's eight attempts, compressed to seconds.
        tuning={"retry_schedule": "0,0.3,0.3,0.3,0.3,0.3,0.3,0.3"},
        smtp_busy=2,
    ),
    Scenario("netns_partition", partitioned_host),
]
