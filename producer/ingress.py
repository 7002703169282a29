"""The HTTP ingress: a FastAPI app over ``channels_core.transports.ingress_http``.

``create_app()`` is what ``channels ingress`` serves (uvicorn, factory mode).
This module only speaks HTTP: it authenticates the bearer token, reads the
request body within a size limit, and maps domain errors to status codes.
Every rule about what may be submitted or read lives in ``HttpIngress``.

Every error is ``application/problem+json`` (RFC 9457) with ``type``,
``title``, ``status`` and ``detail``; bad input is always a 4xx, never a
500. ``/openapi.json`` documents each operation's responses, error bodies
included, and the message body's schema is the one the domain validates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

from fastapi import Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from channels_core import __version__, db
from channels_core.deliveries import DeliveryView
from channels_core.endpoints import EndpointView
from channels_core.errors import (
    AuthenticationError,
    ChannelsError,
    ConfigurationError,
    ConflictError,
    ContentTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from channels_core.settings import get_settings
from channels_core.transports.base import TransportResult
from channels_core.transports.ingress_http import (
    MAX_ID,
    HttpIngress,
    InvalidBodyError,
    MessageView,
    SubmitBody,
    SubscribeBody,
    UnsupportedContentTypeError,
)
from channels_core.transports.registry import ingress_registry

__all__ = [
    "create_app",
    "Problem",
    "FieldProblem",
    "ResultOut",
    "SubmitOut",
    "AttemptOut",
    "DeliveryOut",
    "MessageOut",
    "MessageStatusOut",
    "SubscriptionOut",
    "HealthOut",
    "PROBLEM_JSON",
    "body_limit",
    "parse_datetime",
    "read_json",
    "problem",
]

log = logging.getLogger("channels.ingress")

PROBLEM_JSON = "application/problem+json"
# Small bodies only: {"subscriber_id": 7}.
_SUBSCRIBE_BODY_LIMIT = 4096


def body_limit() -> int:
    """Largest request body read: room for content at the limit, JSON-escaped, and fields."""
    return get_settings().max_content_bytes * 2 + 64 * 1024


# -- bodies ------------------------------------------------------------------------------


class FieldProblem(BaseModel):
    field: str = Field(description="Where: a body field, or 'query.limit', 'path.channel_id'.")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document: every error this API returns."""

    model_config = ConfigDict(title="Problem", extra="allow")

    type: str = Field(description="A URI naming the kind of problem.")
    title: str = Field(description="Short, the same for every problem of this type.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request, and how to fix it.")
    errors: list[FieldProblem] | None = Field(
        default=None, description="For 422: each invalid field and why."
    )


class ResultOut(BaseModel):
    """A channel's share of a message: deliveries so far."""

    channel_id: int
    success: bool = Field(description="False once any delivery on this channel is dead.")
    delivered_count: int
    failed_count: int
    pending_count: int
    errors: list[str]

    @classmethod
    def of(cls, r: TransportResult) -> ResultOut:
        assert r.channel_id is not None
        return cls(
            channel_id=r.channel_id,
            success=r.success,
            delivered_count=r.delivered_count,
            failed_count=r.failed_count,
            pending_count=r.pending_count,
            errors=list(r.errors),
        )


class SubmitOut(BaseModel):
    message_id: int
    status_url: str = Field(description="Where to follow the message: GET it for its state.")
    replayed: bool = Field(
        description="True when an idempotency key named an earlier submission: nothing new "
        "was created and message_id is that submission's."
    )
    results: list[ResultOut]


class AttemptOut(BaseModel):
    attempt: int
    status: str
    status_code: int | None
    error: str | None
    latency_ms: float | None
    started_at: datetime
    finished_at: datetime
    transport: str


class DeliveryOut(BaseModel):
    """One message to one subscriber over one channel; ``attempt_log`` holds every try."""

    id: int
    message_id: int
    channel_id: int
    subscriber_id: int
    transport: str
    status: Literal["pending", "retrying", "delivered", "dead"]
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    attempt_log: list[AttemptOut]

    @classmethod
    def of(cls, d: DeliveryView) -> DeliveryOut:
        return cls.model_validate(d, from_attributes=True)


class MessageOut(BaseModel):
    id: int
    author_id: int | None
    content: str
    content_type: str
    reply_to_id: int | None
    conversation_id: int | None
    references: list[int]
    created_at: datetime

    @classmethod
    def of(cls, m: MessageView) -> MessageOut:
        return cls.model_validate(m, from_attributes=True)


class MessageStatusOut(MessageOut):
    results: list[ResultOut] = Field(description="One per channel the message was accepted on.")
    deliveries: list[DeliveryOut] = Field(description="The first 100 deliveries.")
    deliveries_url: str = Field(description="Every delivery, with a limit of your choosing.")


class SubscriptionOut(BaseModel):
    id: int
    channel_id: int
    subscriber_id: int
    created_at: datetime


class EndpointEventOut(BaseModel):
    event: Literal["opened", "half_open", "closed", "disabled", "enabled"]
    reason: str | None
    at: datetime


class EndpointOut(BaseModel):
    """A webhook endpoint's switch, breaker state and limit."""

    id: int
    url: str
    host: str
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    rate_limit: float | None = Field(description="Deliveries a second; null for the default.")
    breaker: Literal["closed", "open", "half_open"]
    failures: int = Field(description="Consecutive failures since the last success.")
    last_event: EndpointEventOut | None

    @classmethod
    def of(cls, v: EndpointView) -> EndpointOut:
        return cls.model_validate(v, from_attributes=True)


class HealthOut(BaseModel):
    status: Literal["ok"]


# -- problems ----------------------------------------------------------------------------


class _Problem(Exception):
    """An HTTP-level refusal (body too large, not JSON) raised inside a handler."""

    def __init__(self, status: int, kind: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.extra = extra


_TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    500: "Internal error",
    503: "Service unavailable",
}

# Most specific first: ContentTooLargeError and UnsupportedContentTypeError are ValidationErrors.
_DOMAIN: list[tuple[type[ChannelsError], int, str]] = [
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDeniedError, 403, "forbidden"),
    (NotFoundError, 404, "not-found"),
    (ConflictError, 409, "conflict"),
    (ContentTooLargeError, 413, "content-too-large"),
    (UnsupportedContentTypeError, 415, "unsupported-content-type"),
    (ValidationError, 422, "invalid-request"),
    (ConfigurationError, 503, "unavailable"),
]


def problem(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": f"urn:channels:problem:{kind}" if kind else "about:blank",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    all_headers = dict(headers or {})
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", 'Bearer realm="channels"')
    return JSONResponse(body, status_code=status, headers=all_headers, media_type=PROBLEM_JSON)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChannelsError)
    for cls, status, kind in _DOMAIN:
        if isinstance(exc, cls):
            extra: dict[str, Any] = {}
            if isinstance(exc, InvalidBodyError):
                extra["errors"] = exc.problems
            headers = {}
            if status == 401:
                given = request.headers.get("authorization") is not None
                headers["WWW-Authenticate"] = 'Bearer realm="channels"' + (
                    ', error="invalid_token"' if given else ""
                )
            return problem(status, str(exc), kind=kind, headers=headers, **extra)
    log.error("unmapped domain error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "an unexpected error occurred", kind="internal")


async def _http_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, _Problem)
    return problem(exc.status, exc.detail, kind=exc.kind, title=exc.title, **exc.extra)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 (path and query parameters), as a problem document."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
            "message": str(err.get("msg", "invalid")),
        }
        for err in exc.errors()
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, f"invalid request: {summary}", kind="invalid-request", errors=errors)


async def _starlette_http(request: Request, exc: Exception) -> JSONResponse:
    """Routing's 404 and 405 (with its Allow header), as problem documents."""
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "Error")
    if exc.status_code == 404:
        detail = f"no such resource: {request.url.path}"
    return problem(exc.status_code, detail, headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OperationalError | InterfaceError):
        log.warning("database unavailable: %s", exc)
        return problem(503, "the database is unavailable; try again shortly", kind="unavailable")
    log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "an unexpected error occurred", kind="internal")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "an unexpected error occurred", kind="internal")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error codes, each a Problem (made problem+json in _openapi)."""
    described = {
        401: "No, a malformed, an unknown or a revoked bearer token.",
        403: "The token's principal may not do this.",
        404: "An id in the path or body names nothing.",
        409: "A conflict: an idempotency key reused with another body, a duplicate.",
        413: "The request body or the message content is over its limit.",
        415: "The request is not JSON, or the message's content_type is not supported.",
        422: "A parameter or body field is invalid, or the body is not valid JSON.",
        503: "A service this depends on is unavailable.",
    }
    return {code: {"model": Problem, "description": described[code]} for code in codes}


# -- reading requests ---------------------------------------------------------------------


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    mime, *params = (part.strip() for part in content_type.split(";"))
    mime = mime.lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


# RFC 3339 date-time, offset required: what the schema's "format: date-time"
# promises. Lax parsing would take "0.5" as a Unix time.
RFC3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def parse_datetime(value: str | None) -> datetime | None:
    """An RFC 3339 date-time (already matched against ``RFC3339``) as an aware datetime."""
    if value is None:
        return None
    text = value.upper().replace("Z", "+00:00")
    date, _, rest = text.partition("T")
    # A leap second (23:59:60) is valid RFC 3339 and not a Python time.
    if rest[6:8] == "60":
        rest = rest[:6] + "59" + rest[8:]
    head, dot, tail = rest.partition(".")
    if dot:  # Python reads at most microseconds; RFC 3339 allows any precision.
        digits = len(tail) - len(tail.lstrip("0123456789"))
        rest = f"{head}.{tail[: min(digits, 6)]}{tail[digits:]}"
    try:
        return datetime.fromisoformat(f"{date}T{rest}")
    except ValueError as exc:
        raise ValidationError(f"since {value!r} is not a valid date-time: {exc}") from exc


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, read within ``limit`` bytes before anything is parsed."""
    declared = request.headers.get("content-length")
    content_type = request.headers.get("content-type")
    not_json = _Problem(
        415,
        "unsupported-media-type",
        "Unsupported media type",
        "the request body must be JSON: send Content-Type: application/json "
        f"(got {content_type or 'none'})",
    )
    # An optional body may be absent altogether, Content-Type and all.
    if not _is_json(content_type) and not (optional and content_type is None):
        raise not_json
    too_large = _Problem(
        413,
        "content-too-large",
        "Content too large",
        f"the request body is over the limit of {limit} bytes",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if optional:
            return {}
        raise InvalidBodyError([{"field": "(body)", "message": "the body is empty"}])
    if content_type is None:  # an optional body that is there after all
        raise not_json
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert.
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise InvalidBodyError([{"field": "(body)", "message": f"the body is {reason}"}]) from exc
    if not isinstance(data, dict):
        raise InvalidBodyError([{"field": "(body)", "message": "must be a JSON object"}])
    return data


# -- the app ------------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API token from `channels principal token PRINCIPAL`.",
)

IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]


async def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> int:
    """The principal the bearer token names (401 otherwise)."""
    if credentials is None:
        given = request.headers.get("authorization")
        raise AuthenticationError(
            "send Authorization: Bearer <token>"
            if given is None
            else "the Authorization header must be 'Bearer <token>'"
        )
    transport: HttpIngress = request.app.state.ingress
    return await transport.authenticate(credentials.credentials)


# Module level: with postponed annotations FastAPI resolves these by name here.
Caller = Annotated[int, Depends(_caller)]


def _json_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }


_LOCATION = {"Location": {"description": "The message's status URL.", "schema": {"type": "string"}}}


def create_app(ingress: HttpIngress | None = None) -> FastAPI:
    """The ingress app; ``ingress`` defaults to the registry's ``http`` transport."""
    transport = ingress if ingress is not None else ingress_registry.get("http")
    assert isinstance(transport, HttpIngress)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        get_settings()  # invalid settings fail at startup, not on the first request
        yield
        await db.dispose()

    app = FastAPI(
        title="channels ingress",
        version=__version__,
        description=(
            "Submit messages to channels and follow their deliveries. Authenticate with "
            "`Authorization: Bearer <token>`; errors are RFC 9457 problem documents."
        ),
        lifespan=lifespan,
    )
    app.state.ingress = transport
    app.add_exception_handler(ChannelsError, _domain_error)
    app.add_exception_handler(_Problem, _http_problem)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(StarletteHTTPException, _starlette_http)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.post(
        "/channels/{channel_id}/messages",
        status_code=201,
        response_model=SubmitOut,
        summary="Submit a message to a channel",
        responses={
            201: {"description": "Accepted: stored and queued for delivery.", "headers": _LOCATION},
            200: {
                "model": SubmitOut,
                "description": "An idempotent replay: the earlier submission's message.",
                "headers": _LOCATION,
            },
            **_errors(401, 403, 404, 409, 413, 415, 422),
        },
        openapi_extra=_json_body(SubmitBody, required=True),
    )
    async def submit_message(
        request: Request, response: Response, channel_id: IdPath, principal_id: Caller
    ) -> SubmitOut:
        body = await read_json(request, body_limit())
        done = await transport.submit(principal_id, channel_id, body)
        status_url = f"/messages/{done.message_id}"
        response.status_code = 201 if done.created else 200
        response.headers["Location"] = status_url
        return SubmitOut(
            message_id=done.message_id,
            status_url=status_url,
            replayed=not done.created,
            results=[ResultOut.of(r) for r in done.results],
        )

    @app.get(
        "/messages/{message_id}",
        response_model=MessageStatusOut,
        summary="A message, its per-channel results and its deliveries",
        responses=_errors(401, 403, 404, 422),
    )
    async def get_message(message_id: IdPath, principal_id: Caller) -> MessageStatusOut:
        status = await transport.message_status(principal_id, message_id)
        return MessageStatusOut(
            **MessageOut.of(status.message).model_dump(),
            results=[ResultOut.of(r) for r in status.results],
            deliveries=[DeliveryOut.of(d) for d in status.deliveries],
            deliveries_url=f"/messages/{message_id}/deliveries",
        )

    @app.get(
        "/messages/{message_id}/deliveries",
        response_model=list[DeliveryOut],
        summary="Every delivery of a message, with its attempts",
        responses=_errors(401, 403, 404, 422),
    )
    async def get_message_deliveries(
        message_id: IdPath,
        principal_id: Caller,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> list[DeliveryOut]:
        views = await transport.message_deliveries(principal_id, message_id, limit=limit)
        return [DeliveryOut.of(d) for d in views]

    @app.get(
        "/channels/{channel_id}/deliveries",
        response_model=list[DeliveryOut],
        summary="A channel's deliveries, newest first (needs channel.manage)",
        responses=_errors(401, 403, 404, 422),
    )
    async def get_channel_deliveries(
        channel_id: IdPath,
        principal_id: Caller,
        status: Literal["pending", "retrying", "delivered", "dead"] | None = None,
        since: Annotated[
            str | None,
            Query(
                pattern=RFC3339,
                description="Only deliveries created at or after this RFC 3339 date-time.",
                json_schema_extra={"format": "date-time"},
            ),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[DeliveryOut]:
        views = await transport.channel_deliveries(
            principal_id, channel_id, status=status, since=parse_datetime(since), limit=limit
        )
        return [DeliveryOut.of(d) for d in views]

    @app.get(
        "/messages/{message_id}/thread",
        response_model=list[MessageOut],
        summary="The reply chain ending at a message, root first",
        responses=_errors(401, 403, 404, 422),
    )
    async def get_thread(message_id: IdPath, principal_id: Caller) -> list[MessageOut]:
        return [MessageOut.of(m) for m in await transport.thread(principal_id, message_id)]

    @app.get(
        "/conversations/{conversation_id}/messages",
        response_model=list[MessageOut],
        summary="A conversation's messages you may read, oldest first",
        responses=_errors(401, 404, 422),
    )
    async def get_conversation_messages(
        conversation_id: IdPath,
        principal_id: Caller,
        after: Annotated[
            int, Query(ge=0, le=MAX_ID, description="Only messages with a larger id.")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[MessageOut]:
        found = await transport.conversation_messages(
            principal_id, conversation_id, after=after, limit=limit
        )
        return [MessageOut.of(m) for m in found]

    @app.post(
        "/channels/{channel_id}/subscriptions",
        status_code=201,
        response_model=SubscriptionOut,
        summary="Subscribe yourself (channel.subscribe) or another principal (channel.manage)",
        responses=_errors(401, 403, 404, 409, 413, 415, 422),
        openapi_extra=_json_body(SubscribeBody, required=False),
    )
    async def subscribe(
        request: Request, channel_id: IdPath, principal_id: Caller
    ) -> SubscriptionOut:
        body = await read_json(request, _SUBSCRIBE_BODY_LIMIT, optional=True)
        sub = await transport.subscribe(principal_id, channel_id, body)
        assert sub.id is not None and sub.channel_id is not None
        assert sub.subscriber_id is not None and sub.created_at is not None
        return SubscriptionOut(
            id=sub.id,
            channel_id=sub.channel_id,
            subscriber_id=sub.subscriber_id,
            created_at=sub.created_at,
        )

    @app.get(
        "/endpoints",
        response_model=list[EndpointOut],
        summary="Webhook endpoints: yours, or every one with channel.manage",
        responses=_errors(401, 422),
    )
    async def list_endpoints(principal_id: Caller) -> list[EndpointOut]:
        return [EndpointOut.of(v) for v in await transport.endpoints(principal_id)]

    @app.post(
        "/endpoints/{endpoint_id}/enable",
        response_model=EndpointOut,
        summary="Switch a disabled endpoint back on (yours, or any with channel.manage)",
        responses=_errors(401, 404, 422),
    )
    async def enable_endpoint(endpoint_id: IdPath, principal_id: Caller) -> EndpointOut:
        return EndpointOut.of(await transport.enable_endpoint(principal_id, endpoint_id))

    @app.get(
        "/healthz",
        response_model=HealthOut,
        summary="Whether the database answers",
        responses=_errors(503),
    )
    async def healthz() -> HealthOut | JSONResponse:
        try:
            await transport.check_database()
        except Exception as exc:  # any failure is "not healthy", never a 500
            # The reason goes to the log only: this endpoint is unauthenticated.
            log.warning("health check failed: %s", exc)
            return problem(503, "the database does not answer", kind="unavailable")
        return HealthOut(status="ok")

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={
            200: {
                "description": "Prometheus text exposition.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **_errors(503),
        },
    )
    async def metrics() -> Response:
        try:
            from channels_core.metrics import exposition
        except ImportError as exc:
            raise _Problem(
                503, "unavailable", "Service unavailable", f"metrics are not available: {exc}"
            ) from exc
        body, content_type = await exposition()
        return Response(body, media_type=content_type)

    app.openapi = _openapi_for(app)  # type: ignore[method-assign]
    return app


def _openapi_for(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The generated schema, made true where FastAPI cannot know better.

    Error responses are ``application/problem+json``; request bodies (read by
    hand, to enforce the size limit before parsing) are the domain's models;
    the content types offered are the settings in force.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code.isdigit() and int(code) >= 400 and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (SubmitBody, SubscribeBody):
            components[model.__name__] = model.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
        allowed = sorted(get_settings().allowed_content_types)
        components["SubmitBody"]["properties"]["content_type"]["enum"] = allowed
        app.openapi_schema = schema
        return schema

    return openapi
