"""A screenshot of Flower's Tasks page showing the channels tasks.

    .venv/bin/python scripts/flower_screenshot.py [--output artifacts/flower-tasks.png]

Starts what it needs on the embedded defaults (PostgreSQL and Valkey under
CHANNELS_HOME, started only if not running), a local webhook receiver, one
worker (``celery -A workers worker``) and ``channels flower`` with
throwaway credentials; sends a few messages (one subscriber fails once, so
a retried batch shows too); waits until Flower lists their tasks; and takes
the screenshot with headless Chromium. Everything it started is stopped by
PID on the way out, the embedded servers included if it started them.

Needs Chromium: ``apt-get install chromium`` on Debian/Ubuntu.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from channels_cli.devservers import WebhookReceiver, free_port
from channels_cli.processes import Process, start_worker
from channels_core import db, embedded, migrate
from channels_core.names import DELIVER_TASK
from channels_core.permissions import SUBMIT
from channels_core.primitives import Channel, Manifest, Message, Permission, Principal, Role
from channels_core.settings import configure, get_settings

__all__ = ["main", "find_chromium", "screenshot"]

REPO = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(chromium: str, url: str, output: Path, *, timeout: float = 90.0) -> None:
    """Headless Chromium, no network beyond ``url``, a profile of its own."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="channels-chromium-") as profile:
        args = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            # The Tasks table is filled by an XHR after load: give it time.
            "--virtual-time-budget=8000",
            f"--screenshot={output}",
            "--window-size=1400,900",
            url,
        ]
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    if result.returncode != 0 or not output.exists():
        raise RuntimeError(f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}")


async def _send(receiver: WebhookReceiver, count: int) -> list[int]:
    stamp = secrets.token_hex(3)
    perm = await Permission.get_or_create(SUBMIT)
    role = Role().set_title(f"flower-demo-{stamp}").add_permission(perm.id)  # type: ignore[arg-type]
    await role.save()
    sender = Principal("service").set_username(f"flower-demo-{stamp}")
    await sender.add_role(role.id).save()  # type: ignore[arg-type]
    channel = Channel().set_title(f"Webhooks {stamp}").set_alias("egress_transport", "http")
    await channel.save()
    for i in range(3):
        path = f"/flower/{stamp}/{i}"
        if i == 0:
            receiver.script(path, [503])  # fails once: a retried batch shows up too
        sub = await Principal("bot").set_alias("endpoint", receiver.url(path)).save()
        await channel.subscribe(sub.id)  # type: ignore[arg-type]
    ids = []
    for n in range(count):
        message = Message().set_content(f"Deploy {n + 1} is live.").set_author_id(sender.id)  # type: ignore[arg-type]
        results = await (await message.send(Manifest([channel]))).wait(timeout=60)
        print(f"  message {message.id}: delivered {results[0].delivered_count}", flush=True)
        ids.append(message.id)  # type: ignore[arg-type]
    await db.dispose()
    return ids  # type: ignore[return-value]


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise TimeoutError(f"{what} within {timeout:g}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "artifacts" / "flower-tasks.png")
    parser.add_argument("--messages", type=int, default=3)
    options = parser.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print(
            "chromium is not installed (looked for: " + ", ".join(BROWSERS) + "); "
            "install it with `apt-get install chromium` and run this again",
            file=sys.stderr,
        )
        return 2

    settings = get_settings()
    allow = settings.egress_allow_cidrs or "127.0.0.0/8"
    before = {s.name for s in embedded.status() if s.running}
    database_url, broker_url = embedded.database_url(), embedded.broker_url()
    migrate.upgrade()
    configure(database_url=database_url, broker_url=broker_url, egress_allow_cidrs=allow)
    user, password = "ops", secrets.token_urlsafe(12)
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="channels-flower-shot-"))
    env = {
        "CHANNELS_HOME": str(settings.home),
        "CHANNELS_DATABASE_URL": database_url,
        "CHANNELS_BROKER_URL": broker_url,
        "CHANNELS_EGRESS_ALLOW_CIDRS": allow,
        "CHANNELS_RETRY_SCHEDULE": "0,1,1",
    }
    receiver = WebhookReceiver().start()
    processes: list[Process] = []
    try:
        print(f"Starting a worker and `channels flower` on 127.0.0.1:{port}; logs in {logs}")
        processes.append(start_worker(env, logs / "worker.log"))
        flower = Process(
            "flower",
            [sys.executable, "-m", "channels_cli", "flower", "--port", str(port)],
            {**env, "CHANNELS_FLOWER_BASIC_AUTH": f"{user}:{password}"},
            logs / "flower.log",
        )
        processes.append(flower)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", auth=(user, password), timeout=10
        ) as client:

            def workers_seen() -> bool:
                if not flower.alive():
                    raise RuntimeError(f"flower exited:\n{flower.log()[-3000:]}")
                try:
                    response = client.get("/workers", params={"json": 1})
                except httpx.TransportError:
                    return False
                # A worker appears once its heartbeat events reach Flower.
                return response.status_code == 200 and bool(response.json()["data"])

            _wait("Flower receiving the worker's events", workers_seen, 60)
            print(f"Sending {options.messages} messages to 3 webhook subscribers")
            message_ids = asyncio.run(_send(receiver, options.messages))

            def all_listed() -> bool:
                tasks = client.get("/api/tasks", params={"taskname": DELIVER_TASK}).json()
                seen = {t["args"].strip("[").split(",")[0] for t in tasks.values()}
                return {str(i) for i in message_ids} <= seen

            _wait("Flower listing every message's tasks", all_listed, 60)
        url = f"http://{user}:{password}@127.0.0.1:{port}/tasks"
        screenshot(chromium, url, options.output)
        print(f"Screenshot of Flower's Tasks page: {options.output}")
        return 0
    finally:
        for process in reversed(processes):
            process.stop()
        receiver.stop()
        started_here = tuple(
            s.name for s in embedded.status() if s.running and s.name not in before
        )
        if started_here:
            embedded.stop(names=started_here)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
