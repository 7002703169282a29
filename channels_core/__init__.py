"""channels_core: the domain of the channels delivery system.

Models, primitives, registries, permissions, transports, settings and
signing. This package must never import Celery, an HTTP framework, the CLI's
process management, ``producer`` or ``workers``: they depend on it, not the
other way round.
"""

from __future__ import annotations

__version__ = "0.1.0"
