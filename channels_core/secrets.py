"""Webhook secret rotation with an overlap, as Standard Webhooks allows.

A subscriber's ``webhook_secret`` alias is the current secret. Rotating
moves it to ``webhook_secret_previous`` with an expiry and sets a new one;
until the expiry every delivery is signed with both (space separated in
``webhook-signature``), so a receiver that still holds the old secret keeps
verifying while it switches. After the expiry only the new one signs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from sqlalchemy import select

from channels_core import db
from channels_core.errors import NotFoundError, ValidationError
from channels_core.models import PrincipalRow
from channels_core.settings import get_settings
from channels_core.signing import SECRET_PREFIX, new_secret

__all__ = ["CURRENT", "PREVIOUS", "signing_secrets", "rotate_secret"]

CURRENT = "webhook_secret"
PREVIOUS = "webhook_secret_previous"


def _previous(value: str | None) -> list[tuple[str, float]]:
    """``"whsec_a@1764300000 whsec_b@1764310000"`` -> [(secret, expires_at)]."""
    found = []
    for part in (value or "").split():
        secret, _, expires = part.rpartition("@")
        try:
            found.append((secret, float(expires)))
        except ValueError:
            continue
    return found


def signing_secrets(aliases: Mapping[str, str], now: float | None = None) -> list[str]:
    """Every secret that signs now: the current ones, then unexpired previous ones."""
    now = time.time() if now is None else now
    current = [s for s in (aliases.get(CURRENT) or "").split() if s]
    previous = [s for s, expires in _previous(aliases.get(PREVIOUS)) if expires > now]
    return current + [s for s in previous if s not in current]


async def rotate_secret(principal_id: int, *, overlap: float | None = None) -> str:
    """Give the principal a new secret; the old one keeps signing for ``overlap`` seconds."""
    overlap = get_settings().secret_overlap if overlap is None else overlap
    if overlap < 0:
        raise ValidationError(f"overlap must be zero or more seconds, not {overlap!r}")
    now = time.time()
    fresh = new_secret()
    async with db.session() as s, s.begin():
        row = await s.scalar(
            select(PrincipalRow).where(PrincipalRow.id == principal_id).with_for_update()
        )
        if row is None:
            raise NotFoundError("principal", principal_id)
        aliases = dict(row.aliases or {})
        kept = [(sec, exp) for sec, exp in _previous(aliases.get(PREVIOUS)) if exp > now]
        for old in (aliases.get(CURRENT) or "").split():
            if old.startswith(SECRET_PREFIX) and overlap > 0:
                kept.append((old, now + overlap))
        aliases[CURRENT] = fresh
        if kept:
            aliases[PREVIOUS] = " ".join(f"{sec}@{exp:.0f}" for sec, exp in kept)
        else:
            aliases.pop(PREVIOUS, None)
        row.aliases = aliases
    return fresh
