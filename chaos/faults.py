"""Faults a scenario plants inside a process through public settings.

``DieBeforeEnqueue`` is a dispatcher (``CHANNELS_DISPATCHER``) that SIGKILLs
its own process when asked to enqueue routing jobs: the producer dies after
its transaction committed and before anything reached the broker, which is
exactly the window the outbox relay exists for.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from channels_core.dispatch import Batch, RouteJob

__all__ = ["DieBeforeEnqueue"]


class DieBeforeEnqueue:
    async def enqueue_routes(self, jobs: Sequence[RouteJob]) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    async def enqueue_batches(self, batches: Sequence[Batch], countdown: float = 0.0) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
