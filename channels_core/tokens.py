"""API tokens: bearer credentials for the HTTP ingress and the WebSocket gateway.

A token is shown once, when issued; only its SHA-256 is stored, so a leaked
database does not leak credentials. Tokens are random (256 bits), so a plain
hash is enough: there is nothing to brute-force that a slow hash would slow.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from channels_core import db
from channels_core.errors import AuthenticationError, NotFoundError
from channels_core.models import PrincipalRow, TokenRow, utcnow

__all__ = ["IssuedToken", "TokenInfo", "issue", "authenticate", "revoke", "tokens_of", "PREFIX"]

PREFIX = "chn_"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    id: int
    principal_id: int
    token: str  # shown once; never stored


@dataclass(frozen=True)
class TokenInfo:
    id: int
    principal_id: int
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


async def issue(principal_id: int) -> IssuedToken:
    token = PREFIX + secrets.token_urlsafe(32)
    async with db.session() as s, s.begin():
        if await s.get(PrincipalRow, principal_id) is None:
            raise NotFoundError("principal", principal_id)
        row = TokenRow(principal_id=principal_id, token_hash=_hash(token), prefix=token[:10])
        s.add(row)
        await s.flush()
        return IssuedToken(row.id, principal_id, token)


async def authenticate(token: str | None) -> int:
    """The principal a bearer token names; ``AuthenticationError`` otherwise."""
    if not token or not token.startswith(PREFIX) or len(token) > 200:
        raise AuthenticationError("a valid bearer token is required")
    async with db.session() as s, s.begin():
        row = await s.scalar(select(TokenRow).where(TokenRow.token_hash == _hash(token)))
        if row is None or row.revoked_at is not None:
            raise AuthenticationError("the bearer token is unknown or revoked")
        row.last_used_at = utcnow()
        return row.principal_id


async def revoke(token_id: int) -> TokenInfo:
    async with db.session() as s, s.begin():
        row = await s.get(TokenRow, token_id)
        if row is None:
            raise NotFoundError("token", token_id)
        if row.revoked_at is None:
            await s.execute(
                update(TokenRow).where(TokenRow.id == token_id).values(revoked_at=utcnow())
            )
            await s.refresh(row)
        return _info(row)


def _info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        row.id, row.principal_id, row.prefix, row.created_at, row.revoked_at, row.last_used_at
    )


async def tokens_of(principal_id: int) -> list[TokenInfo]:
    async with db.session() as s:
        rows = await s.scalars(
            select(TokenRow).where(TokenRow.principal_id == principal_id).order_by(TokenRow.id)
        )
        return [_info(r) for r in rows]
