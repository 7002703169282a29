"""Standard Webhooks signing: ``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``.

Secrets look like ``whsec_<base64 of 24+ random bytes>``. During a rotation
an endpoint has several secrets and every one signs, space separated, so a
receiver holding either verifies. The ``standardwebhooks`` package verifies
what this module produces (tests check it).
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Iterable
from functools import lru_cache

from channels_core.errors import ValidationError

__all__ = ["new_secret", "sign", "signature_headers", "secret_bytes", "SECRET_PREFIX"]

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise ValidationError("webhook_secret must be 'whsec_' followed by base64") from exc


# A fan-out signs with the same few secrets thousands of times: decoded once.
_key = lru_cache(maxsize=1024)(secret_bytes)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.digest(_key(secret), to_sign, "sha256")  # one call, no HMAC object
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secrets_: Iterable[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_),
    }
