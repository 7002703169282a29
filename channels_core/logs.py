"""Structured logs: one JSON object per line when ``CHANNELS_LOG_FORMAT=json``.

Every line has ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``;
whatever a caller passed as ``extra=`` (``message_id``, ``channel_id``,
``delivery_id``, ``delivery_ids``, ``transport``, counts, ``reason``) is
added as top-level keys, so a log pipeline can follow one message or one
delivery across workers by id without parsing prose.

This module knows nothing of Celery: the worker installs the formatter and
passes a ``context`` callable that adds ``task_id`` / ``task_name`` of the
task running now (``workers/app.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "use_json", "wants_json", "STANDARD_FIELDS"]

# Keys of the JSON object that come from the record itself; ``extra=`` keys
# with these names would clobber them, so they are dropped.
STANDARD_FIELDS = ("ts", "level", "logger", "msg", "pid", "exc")

# Attributes every LogRecord has; anything else on a record came from
# ``extra=`` (or a filter) and belongs in the JSON object.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "color_message"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON.

    ``context`` is called per record and may add keys (the current task's
    id); it must be cheap and must not log.
    """

    def __init__(self, context: Callable[[], Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if self._context is not None:
            for key, value in self._context().items():
                entry.setdefault(key, _jsonable(value))
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in STANDARD_FIELDS:
                entry[key] = _jsonable(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # One line per record, whatever the message holds: json.dumps escapes newlines.
        return json.dumps(entry, ensure_ascii=False, default=str)


def wants_json(log_format: str) -> bool:
    """Whether the ``log_format`` setting asks for JSON (case-insensitive)."""
    return log_format.strip().lower() == "json"


def use_json(
    loggers: Iterable[logging.Logger],
    context: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Give every handler of these loggers the JSON formatter."""
    formatter = JsonFormatter(context)
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter)
