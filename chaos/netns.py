"""Scenario 12: two worker hosts in network namespaces of their own, one cut off.

Each "host" is a worker started under ``unshare -n``: a fresh network
namespace with nothing but its own loopback. ``chaos.nsrelay`` inside it
listens on the same 127.0.0.1 ports as PostgreSQL, Valkey and the webhook
sink and forwards them over Unix sockets (files cross namespaces) to
``ResetProxy`` instances on this side, one per host and server. Cutting a
host off is resetting its database and broker proxies and refusing new
connections for the partition's length; its webhook path stays up, as a
host that lost its backend network but not the internet would.

Needs permission to create network namespaces (root, as CI runs); without
it the scenario is skipped with the reason printed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from sqlalchemy.engine import make_url

from chaos.ledger import Result
from chaos.proxy import ResetProxy
from chaos.stack import wait_ready
from chaos.world import World

__all__ = ["partitioned_host", "netns_unavailable"]


def netns_unavailable() -> str:
    """Why network namespaces cannot be made here, or '' when they can."""
    try:
        probe = subprocess.run(
            ["unshare", "-n", "--", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare/ip: {exc}"
    if probe.returncode != 0:
        return f"unshare -n failed (needs CAP_SYS_ADMIN): {probe.stderr.strip()[:200]}"
    return ""


def partitioned_host(w: World) -> Result:
    reason = netns_unavailable()
    if reason:
        return Result(w.scene.name, skipped=reason)
    from chaos.scenarios import http_channel, settle_timeout, size

    sink = w.http(hold=0.05)
    w.author()
    http_channel(w, sink, ["ok"] * size(w))
    pg_port = int(make_url(w.chaos.database_url).port or 0)
    valkey_port = int(w.chaos.broker_url.rsplit(":", 1)[1].split("/")[0])
    ports = [pg_port, valkey_port, sink.port]
    backend: dict[str, list[ResetProxy]] = {}
    hosts = []
    for host in ("a", "b"):
        folder = w.chaos.home / "netns" / f"{w.scene.name}-{host}"
        folder.mkdir(parents=True, exist_ok=True)
        proxies = [ResetProxy(port, unix_path=folder / f"{port}.sock").start() for port in ports]
        for proxy in proxies:
            w.scene.cleanups.append(proxy.stop)
        backend[host] = proxies[:2]  # the database and the broker, not the sink
        relay = (
            f"ip link set lo up && ({shlex.quote(sys.executable)} -m chaos.nsrelay "
            f"{shlex.quote(str(folder))} {' '.join(map(str, ports))} &) && sleep 0.5 && "
            'exec "$@"'
        )
        prefix = ["unshare", "-n", "--", "sh", "-c", relay, f"host-{host}"]
        hosts.append(w.scene.start_worker(f"host-{host}", prefix=prefix, wait=False))
    beat = w.scene.start_beat(wait=False)
    wait_ready(*hosts, beat)
    w.send()
    w.wait_delivered(0.15)
    partition = 10.0 if w.quick else 30.0
    before = w.final_count()
    cut = sum(proxy.cut(partition) for proxy in backend["b"])
    fault_at = time.monotonic()
    time.sleep(partition)
    during = w.final_count() - before
    result = w.reconcile(w.settle(fault_at, settle_timeout(w)))
    result.notes.append(
        f"host b cut off for {partition:g}s ({cut} connections reset); "
        f"{during} deliveries completed meanwhile"
    )
    if w.quick:
        result.notes.append("quick run: a 10 s partition (30 s in the full run)")
    if during == 0 and w.final_count() < len(w.accepted.pairs):
        result.failures.append("nothing was delivered while host b was cut off")
    if sink.overlaps:
        result.failures.append(f"{len(set(sink.overlaps))} deliveries ran twice in parallel")
    for process in (*hosts, beat):
        if not process.alive():
            result.failures.append(f"{process.name} died")
    return result
