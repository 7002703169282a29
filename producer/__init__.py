"""The sending side applications import: ``Producer`` and ``AsyncProducer``.

Both persist a message and its outbox entries in one transaction and
enqueue routing by task name; ``Producer`` is the synchronous face for
Django, Flask or Celery code (``producer.send(...)`` works like
``task.delay()``) and runs the same coroutines on a private event loop.
This package never imports ``workers``.
"""

from __future__ import annotations

from producer.core import AsyncProducer, Producer

__all__ = ["Producer", "AsyncProducer"]
