"""``channels flower``: real Flower on the real worker's events, behind basic auth."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2e.conftest import Stack
from e2e.helpers import author, channel, deliveries, subscribers, tag

from channels_cli.devservers import free_port
from channels_cli.processes import Process
from channels_core.names import DELIVER_TASK, SWEEP_TASK
from channels_core.primitives import Manifest, Message

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

USER, PASSWORD = "ops", "s3cret-pass"


def _flower_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "channels_cli", "flower", *args]


def _tasks(client: httpx.Client, name: str) -> dict[str, Any]:
    response = client.get("/api/tasks", params={"taskname": name})
    response.raise_for_status()
    tasks: dict[str, Any] = response.json()
    return tasks


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.25)
    raise TimeoutError(f"{what} within {timeout:g}s")


@pytest.fixture(scope="module")
def flower(stack: Stack) -> Iterator[httpx.Client]:
    """``channels flower`` as an operator starts it; a client holding its credentials."""
    port = free_port()
    env = {**stack.env, "CHANNELS_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    process = Process("flower", _flower_cmd("--port", str(port)), env, stack.logs / "flower.log")
    stack.started.append(process)  # stopped by PID with the stack, whatever happens here
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(USER, PASSWORD), timeout=10.0)

    def up() -> bool:
        if not process.alive():
            raise RuntimeError(f"flower exited:\n{process.log()[-3000:]}")
        try:
            return client.get("/healthcheck").status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait("flower answering", up, 30)
        # Flower sees only the events sent while it listens: wait until beat's
        # sweeps show up, so the event stream is live before anything is sent.
        _wait("flower seeing the worker's events", lambda: _tasks(client, SWEEP_TASK), 30)
        yield client
    finally:
        client.close()
        process.stop()


async def test_flower_lists_the_delivery_tasks_of_a_message(
    live: Stack, flower: httpx.Client
) -> None:
    t = tag()
    sender, ch = await author(), await channel("http")
    await subscribers(ch, [{"endpoint": live.http.url(f"/{t}/{i}")} for i in range(2)])
    msg = Message().set_content(f"flower {t}").set_author_id(sender.id)  # type: ignore[arg-type]
    dispatch = await msg.send(Manifest([ch]))
    [result] = await dispatch.wait(timeout=60)
    assert result.delivered_count == 2
    delivery_ids = sorted(d.id for d in await deliveries(msg.id))  # type: ignore[arg-type]

    def ours() -> list[dict[str, Any]]:
        found = []
        for task in _tasks(flower, DELIVER_TASK).values():
            # Flower shows the arguments as Celery's repr: [message_id, channel_id, [ids]].
            args = ast.literal_eval(task.get("args") or "[]")
            if args and args[0] == msg.id:
                found.append({**task, "parsed": args})
        done = [task for task in found if task.get("state") == "SUCCESS"]
        return done if done else []

    [task] = _wait(f"a {DELIVER_TASK} task of message {msg.id} in flower", ours, 30)
    assert task["name"] == DELIVER_TASK
    assert task["parsed"][1] == ch.id
    assert sorted(task["parsed"][2]) == delivery_ids
    assert task["worker"]  # the worker it ran on, by hostname

    # The routing task is listed too, by its readable name.
    routes = _tasks(flower, "channels.route_message")
    jobs = [job for r in routes.values() for job in ast.literal_eval(r["args"])[0]]
    assert any(job[1] == msg.id and job[2] == ch.id for job in jobs)


def test_flower_refuses_requests_without_the_right_credentials(flower: httpx.Client) -> None:
    base = str(flower.base_url)
    for auth in (None, (USER, "wrong"), ("intruder", PASSWORD)):
        for path in ("/api/tasks", "/tasks", "/"):
            response = httpx.get(base + path, auth=auth, timeout=10.0)
            assert response.status_code == 401, (path, auth, response.status_code)
    assert flower.get("/api/tasks").status_code == 200


def _run_flower(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _flower_cmd("--port", str(free_port()), *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("credentials", "args", "complaint"),
    [
        (None, (), "CHANNELS_FLOWER_BASIC_AUTH"),
        ("", (), "CHANNELS_FLOWER_BASIC_AUTH"),
        ("no-colon", (), "user:password"),
        ("ops:", (), "user:password"),
        ("ops:a,b", (), "comma"),
        (None, ("--no-auth", "--address", "0.0.0.0"), "loopback only"),
    ],
)
def test_flower_refuses_to_start_without_credentials(
    stack: Stack, credentials: str | None, args: tuple[str, ...], complaint: str
) -> None:
    env = {**os.environ, **stack.env}
    env.pop("CHANNELS_FLOWER_BASIC_AUTH", None)
    if credentials is not None:
        env["CHANNELS_FLOWER_BASIC_AUTH"] = credentials
    result = _run_flower(env, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and complaint in lines[0], lines
