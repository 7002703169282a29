"""compose.yaml and the Dockerfile run the project's own entry points.

No Docker needed: the files are parsed and every command is checked
against the click CLI (``channels ...``, arguments included) or Celery's
``-A workers`` subcommands, every ``CHANNELS_*`` variable against the
Settings model.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from channels_cli.main import cli
from channels_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"

# Services pulled as images; every other one is built from the Dockerfile.
THIRD_PARTY = {"postgres": "postgres:", "redis": "redis:", "mailpit": "axllent/mailpit"}
SERVICES = {
    "postgres",
    "redis",
    "migrate",
    "worker",
    "beat",
    "ingress",
    "gateway",
    "flower",
    "mailpit",
}
CELERY_SUBCOMMANDS = {"worker", "beat", "flower"}


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _built() -> list[str]:
    return sorted(name for name, service in _services().items() if "build" in service)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def resolve_cli(args: list[str]) -> click.Command:
    """Parse ``channels ARGS`` as the console script would, without running it.

    Raises ``click.UsageError`` for an unknown command or option, or a bad value.
    """
    ctx = cli.make_context("channels", list(args), resilient_parsing=False)
    command: click.Command = cli
    rest = [*ctx._protected_args, *ctx.args]
    while isinstance(command, click.Group):
        if not rest:
            raise click.UsageError("a group, not a command", ctx)
        name, found, rest = command.resolve_command(ctx, rest)
        assert found is not None and name is not None
        ctx = found.make_context(name, rest, parent=ctx)
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        command = found
    return command


def check_entry_point(argv: list[str]) -> None:
    """Fail unless ``argv`` is ``channels <real command>`` or ``celery -A workers <sub>``."""
    if argv[:1] == ["channels"]:
        resolve_cli(argv[1:])
        return
    if argv[:3] == ["celery", "-A", "workers"] and len(argv) > 3:
        assert argv[3] in CELERY_SUBCOMMANDS, f"not a channels Celery entry point: {argv}"
        return
    raise AssertionError(f"not an entry point of this project: {argv}")


def test_compose_has_every_piece() -> None:
    assert set(_services()) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_only_postgres_redis_and_mailpit_come_without_a_build(name: str) -> None:
    service = _services()[name]
    if name in THIRD_PARTY:
        assert "build" not in service
        assert str(service["image"]).startswith(THIRD_PARTY[name])
        assert ":" in service["image"], "pin a tag"
    else:
        assert service.get("build") == ".", f"{name} must run the project image"


@pytest.mark.parametrize("name", _built())
def test_every_built_service_runs_a_real_entry_point(name: str) -> None:
    check_entry_point(_command(_services()[name]))


@pytest.mark.parametrize(
    "argv",
    [
        ["channels", "nonsense"],
        ["channels", "db"],
        ["channels", "db", "downgrade"],
        ["channels", "flower", "--adress", "0.0.0.0"],
        ["channels", "flower", "--port", "http"],
        ["celery", "-A", "workers", "events"],
        ["celery", "-A", "other", "worker"],
        ["python", "-m", "http.server"],
    ],
)
def test_the_entry_point_check_can_fail(argv: list[str]) -> None:
    with pytest.raises((click.ClickException, AssertionError)):
        check_entry_point(argv)


def test_the_entry_point_check_accepts_real_ones() -> None:
    for argv in (
        ["channels", "db", "upgrade"],
        ["channels", "flower", "--address", "0.0.0.0", "--port", "5555"],
        ["channels", "worker", "--concurrency", "4"],
        ["celery", "-A", "workers", "beat"],
    ):
        check_entry_point(argv)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_channels_variable_is_a_setting(name: str) -> None:
    fields = {f"CHANNELS_{field.upper()}" for field in Settings.model_fields}
    env = _environment(_services()[name])
    unknown = sorted(k for k in env if k.startswith("CHANNELS_") and k not in fields)
    assert unknown == []
    if name not in THIRD_PARTY:
        assert {"CHANNELS_DATABASE_URL", "CHANNELS_BROKER_URL"} <= env.keys()


def test_services_start_in_order_and_scale_as_they_should() -> None:
    services = _services()
    assert services["migrate"]["command"] == ["channels", "db", "upgrade"]
    assert services["migrate"].get("restart") == "no"
    for name in _built():
        if name == "migrate":
            continue
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"] == {"condition": "service_healthy"}, name
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    assert services["beat"]["deploy"]["replicas"] == 1
    for name, service in services.items():
        assert "container_name" not in service, name
        if name not in ("migrate", "beat"):
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_published_ports_listen_on_loopback_only() -> None:
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_flower_needs_credentials_in_compose_too() -> None:
    flower = _services()["flower"]
    argv = _command(flower)
    assert "--no-auth" not in argv
    assert "CHANNELS_FLOWER_BASIC_AUTH" in _environment(flower)


def _dockerfile() -> list[tuple[str, str]]:
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        match = re.match(r"\s*([A-Za-z]+)\s+(.*)", line)
        if match and not line.lstrip().startswith("#"):
            found.append((match.group(1).upper(), match.group(2).strip()))
    return found


def test_dockerfile_builds_the_packages_and_runs_as_a_user() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    instructions = _dockerfile()
    copied = {args.split()[0] for op, args in instructions if op == "COPY"}
    assert set(packages) <= copied
    assert any(op == "RUN" and "pip install ." in args for op, args in instructions)
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    [cmd] = [args for op, args in instructions if op == "CMD"]
    check_entry_point(json.loads(cmd))
