"""``AsyncProducer`` and its synchronous face ``Producer``: one implementation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

from channels_core import db
from channels_core.errors import NotFoundError, ValidationError
from channels_core.primitives import Channel, Message
from channels_core.sending import Dispatch, check_messages, send_messages

__all__ = ["AsyncProducer", "Producer"]

T = TypeVar("T")
ChannelRef = Channel | int


async def _channels(refs: Iterable[ChannelRef] | ChannelRef) -> list[Channel]:
    items = [refs] if isinstance(refs, Channel | int) else list(refs)
    if not items:
        raise ValidationError("send() needs at least one channel")
    channels = []
    for ref in items:
        if isinstance(ref, Channel):
            channels.append(ref)
            continue
        if isinstance(ref, bool) or not isinstance(ref, int):
            raise ValidationError(f"a channel is a Channel or an id, not {ref!r}")
        found = await Channel.get(ref)
        if found is None:
            raise NotFoundError("channel", ref)
        channels.append(found)
    return channels


def _message(spec: Message | Mapping[str, Any]) -> Message:
    if isinstance(spec, Message):
        return spec
    unknown = set(spec) - {
        "content",
        "author_id",
        "content_type",
        "reply_to_id",
        "conversation_id",
        "references",
    }
    if unknown:
        raise ValidationError(f"unknown message fields: {', '.join(sorted(unknown))}")
    message = Message()
    message.set_content(spec.get("content"))  # type: ignore[arg-type]
    if spec.get("author_id") is None:
        raise ValidationError("a message needs an author_id before it is sent")
    message.set_author_id(spec["author_id"])
    message.set_content_type(spec.get("content_type", "text/plain"))
    message.set_reply_to_id(spec.get("reply_to_id"))
    message.set_conversation_id(spec.get("conversation_id"))
    for ref in spec.get("references") or ():
        message.add_reference(ref)
    return message


class AsyncProducer:
    """Send messages from async code."""

    async def send(
        self,
        channels: Iterable[ChannelRef] | ChannelRef,
        content: str,
        *,
        author_id: int,
        content_type: str = "text/plain",
        reply_to_id: int | None = None,
        conversation_id: int | None = None,
        references: Iterable[int] = (),
        wait: bool = False,
        timeout: float = 30.0,
    ) -> Dispatch:
        message = _message(
            {
                "content": content,
                "author_id": author_id,
                "content_type": content_type,
                "reply_to_id": reply_to_id,
                "conversation_id": conversation_id,
                "references": list(references),
            }
        )
        return await self.send_message(message, channels, wait=wait, timeout=timeout)

    async def send_message(
        self,
        message: Message,
        channels: Iterable[ChannelRef] | ChannelRef,
        *,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> Dispatch:
        [dispatch] = await send_messages([message], await _channels(channels))
        if wait:
            await dispatch.wait(timeout=timeout)
        return dispatch

    async def send_many(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        channels: Iterable[ChannelRef] | ChannelRef,
        *,
        chunk: int = 1000,
    ) -> list[Dispatch]:
        """Persist and enqueue many messages: one transaction and a few
        routing tasks per ``chunk``, instead of one of each per message.

        A bad message anywhere in ``messages`` is refused before the first
        chunk commits, so a refusal changes nothing.
        """
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValidationError(f"chunk must be a positive integer, not {chunk!r}")
        built = [_message(m) for m in messages]
        targets = await _channels(channels)
        if len(built) > chunk:
            # More than one transaction: check every message before the first commits.
            await check_messages(built)
        dispatches: list[Dispatch] = []
        for i in range(0, len(built), chunk):
            dispatches.extend(await send_messages(built[i : i + chunk], targets))
        return dispatches


class Producer:
    """The synchronous face: the same calls, blocking, from any thread.

    A private event loop on a daemon thread runs the coroutines, so the
    database pool survives between calls and never meets the caller's loop.
    """

    def __init__(self) -> None:
        self._async = AsyncProducer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="channels-producer", daemon=True
                )
                self._thread.start()
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def send(
        self, channels: Iterable[ChannelRef] | ChannelRef, content: str, **kwargs: Any
    ) -> Dispatch:
        return self._run(self._async.send(channels, content, **kwargs))

    def send_message(
        self, message: Message, channels: Iterable[ChannelRef] | ChannelRef, **kwargs: Any
    ) -> Dispatch:
        return self._run(self._async.send_message(message, channels, **kwargs))

    def send_many(
        self,
        messages: Iterable[Message | Mapping[str, Any]],
        channels: Iterable[ChannelRef] | ChannelRef,
        **kwargs: Any,
    ) -> list[Dispatch]:
        return self._run(self._async.send_many(messages, channels, **kwargs))

    def wait(self, dispatch: Dispatch, timeout: float = 30.0) -> list[Any]:
        """Block until every delivery of ``dispatch`` is final."""
        return self._run(dispatch.wait(timeout=timeout))

    def close(self) -> None:
        """Close the pool and stop the private loop."""
        if self._loop is None or self._loop.is_closed():
            return
        self._run(db.dispose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
