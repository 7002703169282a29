"""Every error the channels system raises, under one root.

    ChannelsError
     ├── NotFoundError              an id that names nothing
     ├── AuthenticationError        no, unknown or revoked credentials
     ├── PermissionDeniedError      the principal lacks a permission
     ├── ValidationError            a value the domain refuses
     │    └── ContentTooLargeError  content over CHANNELS_MAX_CONTENT_BYTES
     ├── ConflictError              a duplicate (subscription, username, ...)
     ├── ConfigurationError         settings or the environment are wrong
     ├── TransportError             a delivery attempt failed
     │    ├── TransientDeliveryError   worth retrying (timeouts, 5xx, 429, SMTP 4xx)
     │    └── PermanentDeliveryError   retrying cannot help (4xx, SMTP 5xx, bad address)
     └── DispatchTimeout            ``dispatch.wait()`` ran out of time

Library exceptions (SQLAlchemy, aiohttp, aiosmtplib) are mapped to these at
the edge with ``raise ... from exc`` so callers catch one family.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ChannelsError",
    "ConfigurationError",
    "ConflictError",
    "ContentTooLargeError",
    "DispatchTimeout",
    "NotFoundError",
    "PermanentDeliveryError",
    "PermissionDeniedError",
    "TransientDeliveryError",
    "TransportError",
    "ValidationError",
]


class ChannelsError(Exception):
    """Root of every error raised by channels_core, producer and workers."""


class NotFoundError(ChannelsError):
    """An id that names no row: ``NotFoundError("channel", 7)``."""

    def __init__(self, kind: str, ident: object) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident} not found")


class AuthenticationError(ChannelsError):
    """No credentials, or credentials that name nobody (unknown or revoked)."""


class PermissionDeniedError(ChannelsError):
    """The principal lacks a permission on a channel."""

    def __init__(self, principal_id: int | None, permission: str, channel_id: int | None) -> None:
        self.principal_id = principal_id
        self.permission = permission
        self.channel_id = channel_id
        super().__init__(
            f"principal {principal_id} lacks permission {permission!r} on channel {channel_id}"
        )


class ValidationError(ChannelsError):
    """A value the domain refuses; the message names the field and why."""


class ContentTooLargeError(ValidationError):
    """Content larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"content is {size} bytes, over the limit of {limit} bytes")


class ConflictError(ChannelsError):
    """The row already exists (a duplicate subscription, username or title)."""


class ConfigurationError(ChannelsError):
    """Settings or the environment cannot work (a bad URL, a missing binary)."""


class TransportError(ChannelsError):
    """A delivery attempt failed; ``status_code`` is the peer's answer, if any."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class TransientDeliveryError(TransportError):
    """Worth retrying; ``retry_after`` is the peer's requested delay in seconds."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code)


class PermanentDeliveryError(TransportError):
    """Retrying cannot help: the delivery ends as a dead letter at once."""


class DispatchTimeout(ChannelsError):
    """``dispatch.wait(timeout=...)`` returned before every delivery was final."""
