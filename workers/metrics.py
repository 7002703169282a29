"""The worker's own Prometheus exporter, on when ``CHANNELS_METRICS_PORT`` > 0.

Deliveries run in the pool's child processes, each with its own memory, so
the engine's counters and histograms (``channels_core.metrics.record_batch``)
use prometheus_client's multiprocess mode: every child writes its values to
files under ``CHANNELS_HOME/prometheus/worker-<pid>/`` and the main process
serves their sum on ``127.0.0.1:<port>``. The directory is chosen before the
pool forks (``worker_init``), wiped then (stale files would add a previous
run's counts) and removed at shutdown.

Never beyond loopback: scrape it with an agent on the same host, or read
the system-wide numbers from the ingress's ``GET /metrics``. Two workers on
one host need two ports; a port in use is logged and the worker runs on
without its exporter rather than refusing to deliver.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import psutil
from celery.signals import worker_init, worker_ready, worker_shutdown

from channels_core.settings import get_settings

__all__ = ["Exporter", "exporter"]

log = logging.getLogger("channels.workers.metrics")

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _prune(root: Path) -> None:
    """Remove the directories of workers that died without their shutdown (SIGKILL)."""
    if not root.is_dir():
        return
    for path in root.glob("worker-*"):
        pid = path.name.removeprefix("worker-")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


class Exporter:
    """The multiprocess directory and the HTTP server of one worker main process."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.port: int | None = None
        self._server: Any = None

    def prepare(self) -> None:
        """Choose multiprocess storage; must run before the pool forks."""
        settings = get_settings()
        if settings.metrics_port <= 0:
            return
        root = (settings.home / "prometheus").resolve()
        directory = root / f"worker-{os.getpid()}"
        shutil.rmtree(directory, ignore_errors=True)
        _prune(root)
        directory.mkdir(parents=True)
        os.environ[_ENV] = str(directory)
        # prometheus_client picks its storage when ``values`` is imported; if
        # anything imported it before the variable was set, pick again so the
        # metrics made later (on first delivery) are shared across children.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
        self.directory = directory

    def start(self) -> None:
        """Serve the children's metrics on 127.0.0.1 (main process, after the fork)."""
        if self.directory is None or self._server is not None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        port = get_settings().metrics_port
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        try:
            self._server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        except OSError as exc:
            log.error("metrics exporter not started: 127.0.0.1:%d: %s", port, exc)
            return
        self.port = port
        log.info("metrics exporter on http://127.0.0.1:%d/metrics", port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            if os.environ.get(_ENV) == str(self.directory):
                del os.environ[_ENV]
                from prometheus_client import values

                values.ValueClass = values.get_value_class()
            self.directory = None


exporter = Exporter()


@worker_init.connect
def _prepare(**_: Any) -> None:
    exporter.prepare()


@worker_ready.connect
def _start(**_: Any) -> None:
    exporter.start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    exporter.stop()
