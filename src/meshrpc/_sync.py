"""``def`` handlers: code written for ``grpc.server(ThreadPoolExecutor(...))``, run unchanged.

Each call of a sync handler runs in meshrpc's bounded thread pool
(``thread_pool_size``), never on the event loop, so health checks and async
handlers keep being answered while every thread is busy.  The handler gets a
``grpc.ServicerContext`` with the sync API (``abort`` raises, ``is_active``,
``time_remaining``, ``add_callback``); requests of a client stream are a plain
iterator; a server stream is any iterator, usually a generator.  The handler's
context variables (``meshrpc.caller()``, the trace context, outgoing metadata)
are the RPC's, copied into the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from ._errors import HandlerShapeError, StatusError
from ._overload import LATE_DETAILS, LoadShedder
from ._service import MethodSpec, RpcKind

Handler = Callable[..., Any]
_END = object()


def is_sync(fn: Callable[..., Any]) -> bool:
    """True for a handler grpc.aio would not await: a plain function or a sync generator."""
    return not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))


class SyncContext:
    """The ``grpc.ServicerContext`` a ``def`` handler gets, over the RPC's grpc.aio context."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self._task = asyncio.current_task()
        self._ended = False

    # -- state of the RPC ---------------------------------------------------

    def is_active(self) -> bool:
        """False once the RPC was cancelled, timed out or finished: stop working then."""
        return not self._ended and not self._context.done()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def cancel(self) -> None:
        """Cancel the RPC (the client sees CANCELLED)."""
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        """Call ``callback()`` when the RPC ends (at once, on the event loop, if it has ended)."""
        context: Any = self._context

        def register() -> None:
            # Registered from this thread, run on the loop: grpc may have run the RPC's done
            # callbacks in between, and one added after that would never be called.
            if context.done():
                callback()
            else:
                context.add_done_callback(lambda _context: callback())

        self._loop.call_soon_threadsafe(register)
        return True

    # -- what the client sent --------------------------------------------------

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._context.peer_identity_key()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    # -- what goes back ------------------------------------------------------

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        coro = self._context.send_initial_metadata(initial_metadata)
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._context.trailing_metadata()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def code(self) -> Any:
        return self._context.code()

    def details(self) -> Any:
        return self._context.details()

    def set_compression(self, compression: grpc.Compression) -> None:
        self._context.set_compression(compression)

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        """End the RPC with ``code``: raises, as grpc's sync ``abort`` does."""
        raise StatusError(details, code=code)

    def abort_with_status(self, status: grpc.Status) -> None:
        self._context.set_trailing_metadata(status.trailing_metadata)
        raise StatusError(status.details, code=status.code)


class RequestIterator(Iterator[Any]):
    """A client stream's requests for a ``def`` handler: ``next()`` blocks its thread, not the loop."""

    def __init__(self, requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._requests = requests
        self._loop = loop
        # The handler's thread reads these and the loop's close() writes them: one lock, so a
        # close() between the check and the wait cannot leave a thread waiting for ever.
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[Any] | None = None
        self._closed = False

    def __next__(self) -> Any:
        with self._lock:
            if self._closed:
                raise grpc.RpcError("the RPC has ended")
            pending = self._pending = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        try:
            item = pending.result()
        except concurrent.futures.CancelledError:
            raise grpc.RpcError("the RPC was cancelled") from None
        if item is _END:
            raise StopIteration
        return item

    async def _next(self) -> Any:
        try:
            return await self._requests.__anext__()
        except StopAsyncIteration:
            return _END

    def close(self) -> None:
        """The RPC ended: a thread waiting for a request wakes up with an error."""
        with self._lock:
            self._closed = True
            pending = self._pending
        if pending is not None:
            pending.cancel()


def _close_later(iterator: Any, last: asyncio.Future[Any] | None, pool: concurrent.futures.Executor) -> None:
    """Close a sync generator in the pool once its running ``next()`` (if any) has returned."""
    close = getattr(iterator, "close", None)
    if close is None:
        return

    def submit(_: object = None) -> None:
        with contextlib.suppress(RuntimeError):  # a pool shut down: the process is ending
            pool.submit(close)

    if last is None or last.done():
        submit()
    else:
        last.add_done_callback(submit)


def _replies_of(spec: MethodSpec, fn: Handler, request: Any, context: SyncContext) -> Iterator[Any]:
    """The replies of a ``def`` stream handler: what it yields, or the iterator it returns."""
    result = fn(request, context)
    if isinstance(result, Message) or not hasattr(result, "__iter__"):
        name = getattr(fn, "__qualname__", spec.name)
        raise HandlerShapeError(
            f"{spec.path} streams its replies: {name} must yield {spec.response_type.DESCRIPTOR.full_name} "
            f"messages (or return an iterator of them), but it returned {type(result).__name__} {_short(result)}"
        )
    return iter(result)


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _in_time(shedder: LoadShedder | None, sync: SyncContext, fn: Handler, *args: Any) -> Any:
    """Run ``fn`` in its thread unless the call's deadline passed while it waited for one
    (or will before ``shedder.min_remaining``): a full pool is a queue too, and a late
    call's work helps nobody."""
    remaining = sync.time_remaining()
    if remaining is not None and remaining <= (shedder.min_remaining if shedder is not None else 0.0):
        if shedder is not None:
            shedder.late += 1
        raise StatusError(LATE_DETAILS, code=grpc.StatusCode.DEADLINE_EXCEEDED)
    return fn(*args)


def adapt(
    spec: MethodSpec, fn: Handler, pool: concurrent.futures.Executor, shedder: LoadShedder | None = None
) -> Handler:
    """``fn``, a ``def`` handler, as an async handler of the same RPC kind."""
    kind = spec.kind
    streaming_requests = kind in (RpcKind.STREAM_UNARY, RpcKind.STREAM_STREAM)

    if kind in (RpcKind.UNARY_UNARY, RpcKind.STREAM_UNARY):

        async def unary_reply(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            loop = asyncio.get_running_loop()
            sync = SyncContext(context, loop)
            first = RequestIterator(request, loop) if streaming_requests else request
            call = functools.partial(contextvars.copy_context().run, _in_time, shedder, sync, fn, first, sync)
            try:
                return await loop.run_in_executor(pool, call)
            finally:
                sync._ended = True
                if streaming_requests:
                    first.close()

        return unary_reply

    async def stream_reply(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        sync = SyncContext(context, loop)
        first = RequestIterator(request, loop) if streaming_requests else request
        run = contextvars.copy_context().run
        replies: Any = None
        last: asyncio.Future[Any] | None = None
        try:
            last = loop.run_in_executor(
                pool, functools.partial(run, _in_time, shedder, sync, _replies_of, spec, fn, first, sync)
            )
            replies = await last
            while True:
                last = loop.run_in_executor(pool, functools.partial(run, next, replies, _END))
                reply = await last
                if reply is _END:
                    break
                yield reply
        finally:
            sync._ended = True
            if streaming_requests:
                first.close()
            if replies is not None:
                _close_later(replies, last, pool)

    return stream_reply
