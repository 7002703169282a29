"""The seed's CLI examples, and the installed ``channels`` console script as a
user runs it: a subprocess configured only through ``CHANNELS_*`` variables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _command() -> list[str]:
    script = Path(sys.executable).parent / "channels"
    return [str(script)] if script.exists() else [sys.executable, "-m", "channels_cli"]


class Shell:
    def __init__(self, database_url: str, home: Path) -> None:
        self.env = {
            **os.environ,
            "CHANNELS_DATABASE_URL": database_url,
            "CHANNELS_HOME": str(home),
            "COLUMNS": "200",
        }

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_command(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str) -> list[str]:
        done = self(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout.splitlines()


def _cells(lines: list[str]) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in lines if line.strip()]


def test_seed_cli_scenario(cli_db: str, tmp_path: Path) -> None:
    """The getting-started guide's CLI section, with a principal to subscribe."""
    sh = Shell(cli_db, tmp_path / "home")

    assert sh.ok("db", "upgrade")[0].startswith("✓ Database already at revision ")
    assert sh.ok("channel", "create", "General Chat") == ["✓ Channel created: General Chat (ID: 1)"]
    assert sh.ok("channel", "create", "Support", "--ingress", "http", "--egress", "websocket") == [
        "✓ Channel created: Support (ID: 2)"
    ]
    assert sh.ok(
        "role",
        "create",
        "member",
        "--permission",
        "channel.submit",
        "--permission",
        "channel.subscribe",
    ) == ["✓ Role created: member (ID: 1) with channel.submit, channel.subscribe"]
    assert sh.ok(
        "principal",
        "create",
        "--kind",
        "user",
        "--username",
        "alice",
        "--email",
        "alice@example.com",
        "--alias",
        "endpoint=https://example.com/hooks/alice",
        "--role",
        "member",
    ) == ["✓ Principal created: alice (ID: 1)"]

    assert sh.ok("channel", "subscribe", "1", "1") == [
        "✓ Subscribed principal 1 to channel 1 (subscription ID: 1)"
    ]
    assert _cells(sh.ok("channel", "list-subscribers", "1")) == [
        ["ID", "Kind", "Username", "Email", "Endpoint", "Queue"],
        ["1", "user", "alice", "alice@example.com", "https://example.com/hooks/alice", "-"],
    ]
    assert _cells(sh.ok("channel", "list")) == [
        ["ID", "Title", "Subscribers", "Egress"],
        ["1", "General Chat", "1", "-"],
        ["2", "Support", "0", "websocket"],
    ]

    refused = sh("channel", "subscribe", "1", "1")
    assert refused.returncode == 1
    assert refused.stderr == "Error: principal 1 is already subscribed to channel 1\n"
    assert refused.stdout == ""

    assert sh.ok("channel", "unsubscribe", "1", "1") == [
        "✓ Unsubscribed principal 1 from channel 1"
    ]
    listed = json.loads("\n".join(sh.ok("channel", "list", "--json")))
    assert [(c["id"], c["title"], c["subscribers"]) for c in listed] == [
        (1, "General Chat", 0),
        (2, "Support", 0),
    ]
    assert json.loads("\n".join(sh.ok("channel", "list-subscribers", "1", "--json"))) == []

    unknown = sh("channel", "subscribe", "99", "1")
    assert (unknown.returncode, unknown.stdout, unknown.stderr) == (
        1,
        "",
        "Error: channel 99 not found\n",
    )
    usage = sh("channel", "subscribe", "abc", "1")
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr


def test_fresh_sqlite_file_from_nothing(tmp_path: Path) -> None:
    """A new user's first minutes: an empty file, `db upgrade` (twice), then work."""
    sh = Shell(f"sqlite:///{tmp_path / 'channels.db'}", tmp_path / "home")

    missing = sh("channel", "list")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "run `channels db upgrade` first" in missing.stderr

    first = sh.ok("db", "upgrade")
    assert len(first) == 1 and first[0].startswith("✓ Database upgraded to revision ")
    second = sh.ok("db", "upgrade")
    assert len(second) == 1 and second[0].startswith("✓ Database already at revision ")
    assert sh.ok("channel", "create", "General Chat") == ["✓ Channel created: General Chat (ID: 1)"]
    assert sh.ok("dev", "status") == [f"No embedded servers under {tmp_path / 'home'}."]


def test_invalid_settings_are_one_clear_line(tmp_path: Path) -> None:
    sh = Shell(f"sqlite:///{tmp_path / 'channels.db'}", tmp_path / "home")
    sh.env["CHANNELS_RETRY_SCHEDULE"] = "soon"
    done = sh("channel", "list")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("Error: invalid settings: CHANNELS_RETRY_SCHEDULE: ")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["channel", "--help"]])
def test_module_entry_point(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "channels_cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CHANNELS_HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout
