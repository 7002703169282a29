"""The embedded servers' URLs are ensured once a second, not on every use
(``channels_core.embedded``). No server is started: ``ensure_*`` are
replaced by counters, so what is measured is how often they are asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from channels_core import embedded
from channels_core.settings import configure, get_settings


@dataclass
class _Server:
    url: str


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Which servers were ensured, in order, with no URL configured."""
    calls: list[str] = []

    def _postgres() -> _Server:
        calls.append("postgres")
        return _Server("postgresql://channels@127.0.0.1:5999/channels")

    def _valkey() -> _Server:
        calls.append("valkey")
        return _Server("redis://127.0.0.1:6999/0")

    monkeypatch.setattr(embedded, "ensure_postgres", _postgres)
    monkeypatch.setattr(embedded, "ensure_valkey", _valkey)
    saved = get_settings()
    configure(saved, database_url="", broker_url="")
    embedded._ensured.clear()
    try:
        yield calls
    finally:
        embedded._ensured.clear()
        configure(saved)


def test_a_url_used_again_within_the_second_is_not_ensured_again(asked: list[str]) -> None:
    for _ in range(50):
        assert embedded.database_url() == "postgresql://channels@127.0.0.1:5999/channels"
        assert embedded.broker_url() == "redis://127.0.0.1:6999/0"
    assert asked == ["postgres", "valkey"]


def test_a_url_is_ensured_again_once_the_second_has_passed(
    asked: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded.database_url()
    monkeypatch.setattr(embedded, "ASK_AGAIN_AFTER", 0.0)
    embedded.database_url()
    assert asked == ["postgres", "postgres"]


def test_stopping_the_servers_forgets_their_urls(
    asked: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded.broker_url()
    monkeypatch.setattr(embedded, "_locked", _NoState)
    embedded.stop()
    embedded.broker_url()
    assert asked == ["valkey", "valkey"]


def test_a_configured_url_is_used_as_it_is(asked: list[str]) -> None:
    configure(get_settings(), database_url="postgresql://u@127.0.0.1:1/x")
    assert embedded.database_url() == "postgresql://u@127.0.0.1:1/x"
    assert asked == []


class _NoState:
    """``_locked`` over an empty state: ``stop`` finds nothing to stop."""

    def __enter__(self) -> dict[str, dict[str, object]]:
        return {}

    def __exit__(self, *exc: object) -> None:
        return None
