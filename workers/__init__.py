"""The Celery side: the app, its tasks, the sweeper.

``celery -A workers worker`` finds ``app`` here; importing the package
registers the tasks.
"""

from __future__ import annotations

from workers import tasks  # noqa: F401  (registers the tasks on the app)
from workers.app import app

__all__ = ["app"]
