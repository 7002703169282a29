"""``channels principal ...`` and ``channels role ...``: who may do what.

Principals are users, bots, services, integrations; roles are named sets of
permissions (``channel.submit``, ``channel.subscribe``, ``channel.manage``)
granted to principals.
"""

from __future__ import annotations

import difflib
from typing import Any

import click

from channels_cli import output
from channels_cli.runtime import ID, KEY_VALUE, run
from channels_core import db
from channels_core.errors import ConflictError, ValidationError
from channels_core.permissions import ALL as BUILTIN_PERMISSIONS
from channels_core.permissions import permissions_of
from channels_core.primitives import Permission, Principal, Role
from channels_core.registries import (
    PrincipalRegistry,
    RoleInfo,
    RoleRegistry,
    SubscriptionRegistry,
)
from channels_core.validation import check_title


async def _permission_titles(principal_id: int) -> list[str]:
    async with db.session() as s:
        return sorted(await permissions_of(s, principal_id))


__all__ = ["principal", "role", "principal_label"]


def principal_label(p: Principal) -> str:
    """What to call a principal in a confirmation: its username, else something."""
    return p.username or p.email or p.aliases.get("name") or p.kind


def _principal_dict(
    p: Principal, roles: dict[int, RoleInfo], *, reveal_secrets: bool = False
) -> dict[str, Any]:
    return {
        "id": p.id,
        "kind": p.kind,
        "username": p.username,
        "email": p.email,
        "aliases": dict(p.aliases) if reveal_secrets else output.mask_secrets(p.aliases),
        "roles": [{"id": r, "title": roles[r].title if r in roles else None} for r in p.roles],
        "created_at": p.created_at,
    }


# -- principal --------------------------------------------------------------


@click.group()
def principal() -> None:
    """Create principals (users, bots, services) and grant them roles."""


async def _create_principal(
    kind: str,
    username: str | None,
    email: str | None,
    aliases: tuple[tuple[str, str], ...],
    role_refs: tuple[str, ...],
) -> Principal:
    new = Principal(kind, username=username)
    if email is not None:
        new.set_email(email)
    for key, value in aliases:
        new.set_alias(key, value)
    for ref in role_refs:
        new.add_role((await RoleRegistry().require(ref)).id)
    return await new.save()


@principal.command("create")
@click.option(
    "--kind",
    metavar="KIND",
    default="user",
    show_default=True,
    help="user, bot, service, system, integration...",
)
@click.option("--username", metavar="NAME", help="A unique name.")
@click.option("--email", metavar="ADDRESS", help="The principal's email address.")
@click.option(
    "--alias",
    "aliases",
    type=KEY_VALUE,
    multiple=True,
    help="An alias a transport reads, e.g. endpoint=https://... (repeatable).",
)
@click.option(
    "--role",
    "roles",
    metavar="ROLE",
    multiple=True,
    help="A role id or title to grant (repeatable).",
)
def create_principal(
    kind: str,
    username: str | None,
    email: str | None,
    aliases: tuple[tuple[str, str], ...],
    roles: tuple[str, ...],
) -> None:
    """Create a principal."""
    saved = run(_create_principal(kind, username, email, aliases, roles))
    output.success(f"Principal created: {principal_label(saved)} (ID: {saved.id})")


async def _principals() -> tuple[list[Principal], dict[int, RoleInfo]]:
    found = list(await PrincipalRegistry().all())
    roles = await RoleRegistry().by_ids({r for p in found for r in p.roles})
    return found, roles


@principal.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_principals(as_json: bool) -> None:
    """List every principal."""
    found, roles = run(_principals())
    if as_json:
        output.print_json([_principal_dict(p, roles) for p in found])
        return
    output.print_table(
        ["ID", "Kind", "Username", "Email", "Roles", "Endpoint"],
        [
            (
                p.id,
                p.kind,
                p.username,
                p.email or p.aliases.get("email"),
                [roles[r].title for r in p.roles if r in roles],
                p.aliases.get("endpoint"),
            )
            for p in found
        ],
        empty="No principals.",
    )


async def _show(principal_id: int) -> dict[str, Any]:
    found = await PrincipalRegistry().require(principal_id)
    roles = await RoleRegistry().by_ids(found.roles)
    data = _principal_dict(found, roles, reveal_secrets=True)
    data["permissions"] = await _permission_titles(principal_id)
    data["subscriptions"] = [c.id for c in await SubscriptionRegistry().get_channels(principal_id)]
    return data


@principal.command("show")
@click.argument("principal_id", metavar="ID", type=ID)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead.")
def show_principal(principal_id: int, as_json: bool) -> None:
    """Show every field of principal ID, including its aliases and secrets."""
    data = run(_show(principal_id))
    if as_json:
        output.print_json(data)
        return
    output.print_fields(
        [
            ("ID", data["id"]),
            ("Kind", data["kind"]),
            ("Username", data["username"]),
            ("Email", data["email"]),
            ("Aliases", data["aliases"]),
            ("Roles", [f"{r['title']} ({r['id']})" for r in data["roles"]]),
            ("Permissions", data["permissions"]),
            ("Subscribed to", [f"channel {c}" for c in data["subscriptions"]]),
            ("Created", data["created_at"]),
        ]
    )


async def _grant(principal_id: int, role_ref: str) -> tuple[RoleInfo, bool]:
    found = await PrincipalRegistry().require(principal_id)
    granted = await RoleRegistry().require(role_ref)
    if granted.id in found.roles:
        return granted, False
    await found.add_role(granted.id).save()
    return granted, True


@principal.command("grant")
@click.argument("principal_id", metavar="PRINCIPAL", type=ID)
@click.argument("role_ref", metavar="ROLE")
def grant(principal_id: int, role_ref: str) -> None:
    """Grant ROLE (an id or a title) to PRINCIPAL. Granting it again is a no-op."""
    granted, changed = run(_grant(principal_id, role_ref))
    named = f"role {granted.title} (ID: {granted.id})"
    if changed:
        output.success(f"Granted {named} to principal {principal_id}")
    else:
        output.note(f"Principal {principal_id} already has {named}")


async def _revoke(principal_id: int, role_ref: str) -> RoleInfo:
    found = await PrincipalRegistry().require(principal_id)
    revoked = await RoleRegistry().require(role_ref)
    if revoked.id not in found.roles:
        raise ValidationError(f"principal {principal_id} does not have role {revoked.title!r}")
    await found.remove_role(revoked.id).save()
    return revoked


@principal.command("revoke")
@click.argument("principal_id", metavar="PRINCIPAL", type=ID)
@click.argument("role_ref", metavar="ROLE")
def revoke(principal_id: int, role_ref: str) -> None:
    """Take ROLE (an id or a title) away from PRINCIPAL."""
    revoked = run(_revoke(principal_id, role_ref))
    output.success(f"Revoked role {revoked.title} (ID: {revoked.id}) from principal {principal_id}")


# -- role -------------------------------------------------------------------


@click.group()
def role() -> None:
    """Create roles: named sets of permissions."""


async def _create_role(title: str, permissions: tuple[str, ...]) -> Role:
    # Everything that can be refused is checked before the first write, so a
    # refused role leaves no stray permission rows behind.
    check_title("title", title)
    for name in permissions:
        check_title("permission", name)
    existing = await RoleRegistry().get_by_title(title)
    if existing is not None:
        raise ConflictError(f"role {title!r} already exists (id {existing.id})")
    new = Role(title)
    for name in dict.fromkeys(permissions):
        new.add_permission(_need(await Permission.get_or_create(name)))
    return await new.save()


def _need(p: Permission) -> int:
    assert p.id is not None  # get_or_create returns a saved permission
    return p.id


@role.command("create")
@click.argument("title", metavar="NAME")
@click.option(
    "--permission",
    "permissions",
    metavar="P",
    multiple=True,
    help=f"A permission title, e.g. {', '.join(BUILTIN_PERMISSIONS)} (repeatable).",
)
def create_role(title: str, permissions: tuple[str, ...]) -> None:
    """Create role NAME holding the given permissions."""
    saved = run(_create_role(title, permissions))
    held = ", ".join(dict.fromkeys(permissions)) or "no permissions"
    output.success(f"Role created: {saved.title} (ID: {saved.id}) with {held}")
    for name in dict.fromkeys(permissions):
        if name not in BUILTIN_PERMISSIONS:
            # Allowed (applications may check their own titles), but most often a typo.
            hint = difflib.get_close_matches(name, BUILTIN_PERMISSIONS, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            output.warn(f"{name!r} is not a built-in permission{extra}")


@role.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_roles(as_json: bool) -> None:
    """List every role with its permissions."""
    found = run(RoleRegistry().all())
    if as_json:
        output.print_json([r.as_dict() for r in found])
        return
    output.print_table(
        ["ID", "Title", "Permissions"],
        [(r.id, r.title, list(r.permissions)) for r in found],
        empty="No roles.",
    )
