"""Settings, read from ``CHANNELS_*`` environment variables.

An unset database or broker URL means "the embedded default": a local
PostgreSQL and a local Valkey started from PyPI wheels under ``./.channels/``
(see ``channels_core.embedded``). Settings are read once per process and can
be replaced in tests with ``configure(...)``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "configure", "DEFAULT_RETRY_SCHEDULE"]

DEFAULT_RETRY_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHANNELS_", extra="ignore")

    database_url: str | None = None
    broker_url: str | None = None
    queue_url: str | None = None
    home: Path = Field(default=Path(".channels"), description="where embedded servers keep data")

    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_from: str = "channels@localhost"
    smtp_timeout: float = 30.0

    egress_allow_cidrs: str = ""
    retry_schedule: str = ",".join(str(s) for s in DEFAULT_RETRY_SCHEDULE)
    retry_jitter: float = 0.1
    max_content_bytes: int = 262144
    content_types: str = (
        "text/plain,text/markdown,text/html,application/json,application/xml,"
        "application/octet-stream,image/png,image/jpeg"
    )

    # Deliveries per delivery task. A batch's fixed costs (claim, load, one
    # record statement, a task) spread over more deliveries at 500 than at
    # 200: S1 +25-60%, S2 +20-40% in back-to-back runs. A batch to a slow
    # endpoint still waits on its slowest request.
    batch_size: int = 500
    # One route page is a handful of statements whatever its size (column
    # arrays), so pages are large: routing 100k subscribers takes 20 of them.
    route_page_size: int = 5000
    # Requests one batch has open at once. Below the batch size a batch to
    # slow endpoints takes two round trips, not one; 512 measured S2 +20%
    # but S1 -20% (more connections to the same fast host) and crowds four
    # processes' batches under the host cap, so it stays at 256.
    max_in_flight: int = 256
    http_connect_timeout: float = 5.0
    http_read_timeout: float = 15.0
    http_deadline: float = 30.0
    http_max_response_bytes: int = 65536
    http_pool_size: int = 256
    # Endpoint health (channels_core.endpoints): consecutive failures that
    # open an endpoint's breaker, the first cool-down before a probe (doubled
    # per failed probe, up to the max), and how long an endpoint may fail
    # without a success before it is disabled (5 days, as Svix).
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=5.0, gt=0)
    breaker_cooldown_max: float = Field(default=300.0, gt=0)
    endpoint_disable_after: float = Field(default=432000.0, gt=0)
    # Deliveries per second to one endpoint when it has no limit of its own; 0 is none.
    endpoint_rate_limit: float = Field(default=0.0, ge=0)
    # A rate limit's burst, in seconds of its rate (0.1 s of 50/s is 5 at once).
    rate_limit_burst: float = Field(default=0.1, gt=0)
    # Rate-limited deliveries book their slot up to book_ahead seconds ahead;
    # a slot within hold is waited for in the worker, a later one in the
    # queue (the delivery comes back for its booked slot).
    rate_limit_hold: float = Field(default=0.25, ge=0)
    rate_limit_book_ahead: float = Field(default=60.0, ge=0)
    # Requests admitted to one host at once, across all workers; 0 is no cap.
    host_max_in_flight: int = Field(default=1000, ge=0)
    # How long a batch waits in its worker for room under that cap, asking
    # again as other batches finish, before the rest goes back to the queue.
    in_flight_hold: float = Field(default=2.0, ge=0)
    # How long a worker trusts its copy of endpoint switches and limits.
    endpoint_cache_ttl: float = Field(default=2.0, ge=0)
    # A batch claimed this many times without finishing (its worker died each
    # time) is split into single deliveries; a single one, dead-lettered.
    poison_claims: int = Field(default=3, ge=2)
    # How long a rotated-out webhook secret keeps signing beside the new one.
    secret_overlap: float = 86400.0
    outbox_relay_after: float = 30.0
    # A task enqueued but not started within this is presumed lost (a broker
    # restart) and the sweeper enqueues another.
    queue_lease: float = 120.0
    # How long a running batch owns its deliveries; longer than any batch runs.
    claim_lease: float = 300.0
    # Retries due sooner than this ride a Celery countdown; later ones wait in
    # the database for the sweeper. Must stay below the visibility timeout.
    countdown_max: float = 30.0
    sweep_limit: int = 5000
    sweep_interval: float = 5.0
    visibility_timeout: int = 3600
    # Tasks a worker reserves per pool process, the running one included: at
    # 2 the next batch is at hand when one ends, instead of a broker round
    # trip later (S1 +20-40%, S2 +0-15% in back-to-back runs).
    worker_prefetch: int = Field(default=2, ge=1)
    thread_depth_limit: int = 1000

    flower_basic_auth: str | None = None
    flower_port: int = 5555

    # HTTP ingress (``channels ingress``).
    ingress_host: str = "127.0.0.1"
    ingress_port: int = 8000
    # WebSocket gateway (``channels gateway``).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8765
    gateway_ack_timeout: float = 5.0
    ws_presence_ttl: float = 30.0
    ws_max_queue_bytes: int = 1048576
    ws_heartbeat: float = 20.0
    # Worker-side Prometheus exporter; 0 leaves it off.
    metrics_port: int = 0
    # "text" or "json" (one JSON object per line, with message and delivery ids).
    log_format: str = "text"
    # Loaded by name so the domain never imports the producer (see dispatch.py).
    dispatcher: str = "producer.broker:BrokerDispatcher"
    # SMTP sessions one email batch is spread over (and idle ones kept per
    # worker event loop for the next batch); how long an idle one is kept.
    smtp_connections: int = Field(default=4, ge=1)
    smtp_pool_idle: float = Field(default=30.0, ge=0)

    @field_validator("retry_schedule")
    @classmethod
    def _schedule_is_numbers(cls, value: str) -> str:
        try:
            steps = [float(part) for part in value.split(",") if part.strip()]
        except ValueError as exc:
            raise ValueError(f"retry_schedule must be comma-separated seconds: {value!r}") from exc
        if not steps or any(step < 0 for step in steps):
            raise ValueError(f"retry_schedule needs at least one non-negative step: {value!r}")
        return value

    @property
    def retry_steps(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.retry_schedule.split(",") if part.strip())

    @property
    def allowed_content_types(self) -> frozenset[str]:
        return _content_types(self.content_types)


@lru_cache(maxsize=8)
def _content_types(value: str) -> frozenset[str]:
    # Checked once per message sent: parse the setting once, not every time.
    return frozenset(t.strip() for t in value.split(",") if t.strip())


@lru_cache(maxsize=1)
def _load() -> Settings:
    return Settings()


_override: Settings | None = None


def get_settings() -> Settings:
    """The settings in force: an override from ``configure`` or the environment."""
    return _override if _override is not None else _load()


def configure(settings: Settings | None = None, **values: object) -> Settings:
    """Replace the settings for this process (tests, embedding applications).

    ``configure(database_url=...)`` layers values over the environment;
    ``configure(None)`` with no values returns to the environment.
    """
    global _override
    if settings is None and not values:
        _override = None
        _load.cache_clear()
        return get_settings()
    base = settings or Settings()
    # Validate the layered values as the environment's would be (types, rules).
    _override = Settings.model_validate({**base.model_dump(), **values}) if values else base
    return _override
