"""The ``channels`` command line: a thin face over the async Python API.

Commands parse arguments, call ``channels_core`` through ``runtime.run``
(one ``asyncio.run`` per command, the pool disposed before the loop closes)
and print through ``output``. Domain errors become one ``Error: ...`` line
and exit status 1 in ``main``; nothing here may import ``workers`` or Celery
at import time, so ``channels channel list`` stays fast and works without a
broker.
"""

from __future__ import annotations

__all__: list[str] = []
