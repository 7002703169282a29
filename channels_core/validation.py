"""Checks every entry point shares: content, content types, addresses, URLs.

Each check raises ``channels_core.errors.ValidationError`` (or a subclass)
with a message naming the field; none of them touches the database, so a
refused value changes nothing.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from channels_core.errors import ContentTooLargeError, ValidationError
from channels_core.settings import get_settings

__all__ = [
    "check_content",
    "check_content_type",
    "check_email",
    "check_endpoint_url",
    "check_header_value",
    "check_queue_name",
    "check_title",
    "check_alias",
]

# Deliberately plain: one @, a dotted domain, no spaces or control characters.
# Deliverability is the SMTP server's call; this refuses what is clearly not an address.
_EMAIL = re.compile(
    r"^[^@\s<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_CONTENT_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")
_QUEUE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_ALIAS_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Hosts made only of numbers (decimal, octal, hex): inet_aton would read
# "2130706433", "0177.0.0.1" or "0x7f.1" as 127.0.0.1. Only the canonical
# dotted quad is accepted, so the SSRF guard sees what will be dialled.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_CANONICAL_V4 = re.compile(
    r"^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$"
)


def check_header_value(field: str, value: str) -> str:
    """Refuse CR, LF and other control characters: they would forge headers."""
    if any(ch in value for ch in "\r\n\x00"):
        raise ValidationError(f"{field} must not contain CR, LF or NUL characters")
    return value


def check_title(field: str, value: object, *, max_length: int = 255) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{field} must be a non-empty string")
    if len(value) > max_length:
        raise ValidationError(f"{field} is {len(value)} characters, over the limit of {max_length}")
    return check_header_value(field, value)


def check_content(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"content must be a string, not {type(value).__name__}")
    if not value:
        raise ValidationError("content must not be empty")
    # PostgreSQL text cannot hold NUL, and a lone surrogate is not UTF-8:
    # refuse both here rather than fail in the driver.
    if "\x00" in value:
        raise ValidationError("content must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError("content is not valid Unicode (it holds a lone surrogate)") from exc
    limit = get_settings().max_content_bytes
    if size > limit:
        raise ContentTooLargeError(size, limit)
    return value


def check_content_type(value: object) -> str:
    if not isinstance(value, str) or not _CONTENT_TYPE.match(value):
        raise ValidationError(f"content_type {value!r} is not a MIME type like 'text/plain'")
    allowed = get_settings().allowed_content_types
    if value not in allowed:
        raise ValidationError(
            f"content_type {value!r} is not supported; use one of {', '.join(sorted(allowed))}"
        )
    return value


def check_email(value: object, field: str = "email") -> str:
    if not isinstance(value, str) or len(value) > 320 or not _EMAIL.match(value):
        raise ValidationError(f"{field} {value!r} is not an email address")
    return value


def check_endpoint_url(value: object, field: str = "endpoint") -> str:
    """An absolute http(s) URL with a host. Where it may connect is the SSRF
    guard's decision at connect time, not this syntax check's."""
    if not isinstance(value, str) or len(value) > 2048:
        raise ValidationError(f"{field} must be a URL string of at most 2048 characters")
    check_header_value(field, value)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"{field} {value!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"{field} {value!r} must use http or https")
    if not parts.hostname:
        raise ValidationError(f"{field} {value!r} has no host")
    if _NUMERIC_HOST.match(parts.hostname) and not _CANONICAL_V4.match(parts.hostname):
        raise ValidationError(
            f"{field} {value!r}: host {parts.hostname!r} is not a canonical IPv4 address"
        )
    if parts.username or parts.password:
        raise ValidationError(f"{field} {value!r} must not carry credentials")
    if port == 0:
        raise ValidationError(f"{field} {value!r} has port 0")
    return value


def check_queue_name(value: object, field: str = "queue") -> str:
    if not isinstance(value, str) or not _QUEUE.match(value):
        raise ValidationError(
            f"{field} {value!r} must be 1-200 characters of letters, digits, '_', '.', ':' or '-'"
        )
    return value


def check_alias(key: object, value: object) -> tuple[str, str]:
    """Aliases are string to string; the ones a transport reads are checked
    by the transport's own rule so a bad endpoint fails at save, not later."""
    if not isinstance(key, str) or not _ALIAS_KEY.match(key):
        raise ValidationError(
            f"alias key {key!r} must start with a letter and hold only a-z, 0-9 and '_'"
        )
    if not isinstance(value, str):
        raise ValidationError(f"alias {key!r} must be a string, not {type(value).__name__}")
    check_header_value(f"alias {key!r}", value)
    if len(value) > 2048:
        raise ValidationError(f"alias {key!r} is over 2048 characters")
    if key == "endpoint":
        check_endpoint_url(value)
    elif key == "email":
        check_email(value)
    elif key == "queue":
        check_queue_name(value)
    return key, value
