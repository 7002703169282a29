"""Monitoring fixtures: the end-to-end stack, observed.

The stack's worker and beat inherit this process's environment, so setting
``CHANNELS_LOG_FORMAT=json`` and ``CHANNELS_METRICS_PORT`` here, before the
module's ``stack`` starts, gives every monitoring module a worker that
writes JSON logs and serves its exporter on a known 127.0.0.1 port; the
stack stops it, by PID, at the end of the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# The e2e fixtures, shared rather than copied: the same worker and receivers.
from e2e.conftest import Stack, e2e_database_url, live, stack  # noqa: F401

from channels_cli.devservers import free_port
from channels_core import metrics

__all__ = ["Observed"]


@dataclass
class Observed:
    metrics_port: int


@pytest.fixture(scope="module", autouse=True)
def observed() -> Iterator[Observed]:
    """Autouse and module-scoped, so it runs before the module's ``stack`` starts."""
    port = free_port()
    values = {"CHANNELS_LOG_FORMAT": "json", "CHANNELS_METRICS_PORT": str(port)}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield Observed(port)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _fresh_tally() -> None:
    """Each test's database starts empty; what an earlier test counted must not carry over."""
    metrics.reset()
