"""Middleware: code that sees every RPC of the app's services, one shape for all four kinds.

A middleware is an async callable ``(call, call_next)``::

    async def require_token(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        if call.metadata.get("authorization") != "Bearer s3cret":
            raise meshrpc.Unauthenticated("missing or wrong token")
        await call_next(call)

``call_next(call)`` runs the rest of the chain and the handler, to the end of
the RPC (every streamed reply written), and raises what the handler raised.
Afterwards ``call.code`` is the status the RPC ends with.  The chain is built
once per method at startup; an RPC pays for one [`Call`][meshrpc.Call] and a coroutine
per middleware, nothing per streamed message.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import grpc

from . import _mesh
from ._caller import Caller, caller_of
from ._errors import AppError
from ._failures import INTERNAL_DETAILS, final_code, wrong_reply
from ._rpc_context import text_metadata
from ._service import MethodSpec, RpcKind

Handler = Callable[..., Any]
F = TypeVar("F", bound=Callable[..., Any])
_SKIP = "_meshrpc_skip_middleware"
logger = logging.getLogger("meshrpc.handlers")


class Call:
    """One RPC, as middleware sees it.

    ``request`` is the request message (``None`` for client-streaming methods, whose
    requests the handler reads).  ``code`` and ``exception`` are set when
    ``call_next`` returns or raises.  ``state`` is a dict for middleware to pass
    values to later middleware and to the handler (``meshrpc.current_call()``).
    """

    __slots__ = (
        "_reached",
        "_reply",
        "_requests",
        "_sent",
        "code",
        "context",
        "exception",
        "request",
        "spec",
        "state",
    )

    def __init__(self, spec: MethodSpec, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        self.spec = spec
        self.context = context
        self.request = request
        self.code: grpc.StatusCode | None = None
        self.exception: BaseException | None = None
        self.state: dict[str, Any] = {}
        self._reply: Any = None
        self._requests: Any = None
        # The replies the chain wrote (telemetry reads it); None where the handler writes them.
        self._sent: int | None = 0
        self._reached = (
            0  # how deep the chain got: 1 + the index of the last middleware run; len(chain) + 1 at the handler
        )

    @property
    def method(self) -> str:
        """The RPC's path: ``/package.Service/Method``."""
        return self.spec.path

    @property
    def service(self) -> str:
        return self.spec.service

    @property
    def method_name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        """``unary_unary``, ``unary_stream``, ``stream_unary`` or ``stream_stream``."""
        return self.spec.kind.value

    @property
    def metadata(self) -> dict[str, str]:
        """The request metadata, text values only (keys are lowercase)."""
        return text_metadata(self.context)

    @property
    def binary_metadata(self) -> dict[str, bytes]:
        """The request's ``-bin`` metadata."""
        return {k: v for k, v in (self.context.invocation_metadata() or ()) if isinstance(v, bytes)}

    @property
    def peer(self) -> str:
        """The connection's peer, as grpc writes it (``ipv4:127.0.0.1:5432``); the sidecar behind a mesh."""
        return self.context.peer()

    @property
    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None without one."""
        remaining = self.context.time_remaining()
        return None if remaining is None or remaining > 1e9 else remaining

    @property
    def caller(self) -> Caller | None:
        """The caller's verified identity (see [`caller`][meshrpc.caller])."""
        return caller_of(self.context, _mesh.current_mode())

    def __repr__(self) -> str:
        code = self.code.name if self.code is not None else "running"
        return f"<Call {self.method} {code}>"


CallNext = Callable[[Call], Awaitable[None]]
_current: contextvars.ContextVar[Call] = contextvars.ContextVar("meshrpc_call")


def current_call() -> Call | None:
    """The current RPC's [`Call`][meshrpc.Call] inside a handler behind middleware, else None.

    Handlers read what middleware put in ``call.state`` this way.
    """
    return _current.get(None)


class Middleware(Protocol):
    """What ``App(middleware=[...])`` takes: ``async def mw(call, call_next) -> None``."""

    def __call__(self, call: Call, call_next: CallNext, /) -> Awaitable[None]: ...


def skip_middleware(*which: Any) -> Any:
    """Keep middleware away from one method.

    ``@meshrpc.skip_middleware`` skips all of the app's middleware;
    ``@meshrpc.skip_middleware(require_token)`` only those named.  Interceptors and
    meshrpc's own telemetry still apply.
    """
    if len(which) == 1 and inspect.isfunction(which[0]) and _is_handler(which[0]):
        setattr(which[0], _SKIP, None)  # None: every middleware
        return which[0]

    def mark(fn: F) -> F:
        setattr(fn, _SKIP, which)
        return fn

    return mark


def _is_handler(fn: Callable[..., Any]) -> bool:
    """A servicer method (self, request, context), not a middleware passed by name."""
    params = list(inspect.signature(fn).parameters)
    return len(params) == 3 and params[0] == "self"


def applicable(spec: MethodSpec, middleware: tuple[Middleware, ...]) -> tuple[Middleware, ...]:
    """The middleware that ``spec``'s method has not opted out of."""
    impl = spec.impl
    if impl is None or not middleware:
        return ()
    skip = getattr(getattr(impl, "__func__", impl), _SKIP, ())
    if skip is None:
        return ()
    return tuple(m for m in middleware if not any(m is skipped for skipped in skip))


def check_middleware(middleware: Iterable[Any]) -> tuple[Middleware, ...]:
    """Validate ``App(middleware=...)`` once, at construction."""
    checked = []
    for item in middleware:
        # A function, a bound method, a functools.partial of one, or an object with an async __call__.
        if not (inspect.iscoroutinefunction(item) or inspect.iscoroutinefunction(getattr(item, "__call__", None))):  # noqa: B004
            raise AppError(
                f"middleware {item!r} must be an 'async def' callable taking (call, call_next), "
                "or an object whose __call__ is one"
            )
        checked.append(item)
    return tuple(checked)


def _ended(call: Call, exc: BaseException | None) -> None:
    call.exception = exc
    call.code = final_code(call.context, exc)


def middleware_name(middleware: object) -> str:
    name = getattr(middleware, "__qualname__", None) or type(middleware).__qualname__
    return str(name)


class CalledTwice(RuntimeError):
    """A middleware called ``call_next`` a second time: a call runs its handler once."""


def _called_twice(chain: tuple[Middleware, ...], depth: int, call: Call) -> CalledTwice:
    name = middleware_name(chain[depth - 2])
    return CalledTwice(f"middleware {name} called call_next twice for {call.method}: a call runs its handler once")


class _Next:
    """``call_next`` for a middleware in the middle of the chain: the next one, and how it ended."""

    __slots__ = ("chain", "depth", "middleware", "rest")

    def __init__(self, chain: tuple[Middleware, ...], depth: int, rest: Any) -> None:
        self.chain = chain
        self.depth = depth  # 1 + this middleware's index in the chain
        self.middleware = chain[depth - 1]
        self.rest = rest

    async def __call__(self, call: Call) -> None:
        if call._reached >= self.depth:
            raise _called_twice(self.chain, self.depth, call)
        call._reached = self.depth
        try:
            await self.middleware(call, self.rest)
        except BaseException as exc:
            _ended(call, exc)
            raise
        _ended(call, None)


def _innermost(spec: MethodSpec, impl: Handler, chain: tuple[Middleware, ...]) -> Callable[[Call], Awaitable[None]]:
    """``call_next`` of the last middleware: the handler itself, and how it ended.

    Streamed replies are written here, not re-yielded.  One frame, not two: a chain of
    one middleware costs the middleware's coroutine and this one.
    """
    streaming_requests = spec.kind in (RpcKind.STREAM_UNARY, RpcKind.STREAM_STREAM)
    depth = len(chain) + 1
    if spec.kind in (RpcKind.UNARY_UNARY, RpcKind.STREAM_UNARY):

        async def reply(call: Call) -> None:
            if call._reached >= depth:
                raise _called_twice(chain, depth, call)
            call._reached = depth
            try:
                call._reply = await impl(call._requests if streaming_requests else call.request, call.context)
            except BaseException as exc:
                _ended(call, exc)
                raise
            _ended(call, None)

        return reply

    if inspect.isasyncgenfunction(impl):
        reply_class = spec.response_type

        async def stream(call: Call) -> None:
            if call._reached >= depth:
                raise _called_twice(chain, depth, call)
            call._reached = depth
            context = call.context
            sent = 0
            try:
                async for reply in impl(call._requests if streaming_requests else call.request, context):
                    if type(reply) is not reply_class and not isinstance(reply, reply_class):
                        await wrong_reply(context, spec, reply)
                    await context.write(reply)
                    sent += 1
            except BaseException as exc:
                _ended(call, exc)
                raise
            finally:
                call._sent = sent
            _ended(call, None)

        return stream

    async def writing(call: Call) -> None:
        if call._reached >= depth:
            raise _called_twice(chain, depth, call)
        call._reached = depth
        call._sent = None  # the handler writes its replies with context.write: not seen here
        try:
            await impl(call._requests if streaming_requests else call.request, call.context)
        except BaseException as exc:
            _ended(call, exc)
            raise
        _ended(call, None)

    return writing


async def _never_called_next(call: Call, chain: tuple[Middleware, ...]) -> None:
    """A middleware returned without calling ``call_next`` and without raising a status:
    there is no reply to send, and the handler never ran.  Its bug, named; never returns."""
    name = middleware_name(chain[call._reached - 1])
    logger.error(
        "middleware %s returned without calling call_next or raising a status for %s: "
        "answered INTERNAL (raise a meshrpc.StatusError to refuse a call)",
        name,
        call.method,
    )
    await call.context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)


def compose(spec: MethodSpec, middleware: tuple[Middleware, ...], impl: Handler) -> Handler:
    """``impl`` behind ``middleware`` (first in the list runs first), as one coroutine.

    ``await composed(request, context)`` runs the whole RPC through the chain and returns
    the reply for the single-reply kinds, and for server streams the number of replies
    the chain wrote (None when the handler writes them itself with ``context.write``):
    streamed replies are written inside the chain, so middleware runs around the whole
    stream and nothing re-yields each message.
    """
    rest: Any = _innermost(spec, impl, middleware)
    for depth in range(len(middleware), 1, -1):
        rest = _Next(middleware, depth, rest)
    first = middleware[0]
    streaming_requests = spec.kind in (RpcKind.STREAM_UNARY, RpcKind.STREAM_STREAM)
    enter = _current.set
    handled = len(middleware) + 1

    # Two shapes, one body: what they return is all that differs (a shared helper would
    # be one more coroutine frame per RPC).
    if spec.kind in (RpcKind.UNARY_UNARY, RpcKind.STREAM_UNARY):

        async def reply(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = Call(spec, context, None if streaming_requests else request)
            call._requests = request
            call._reached = 1
            enter(call)  # each RPC runs in its own task: no reset needed
            await first(call, rest)
            if call._reached != handled:
                await _never_called_next(call, middleware)
            return call._reply

        return reply

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> int | None:
        call = Call(spec, context, None if streaming_requests else request)
        call._requests = request
        call._reached = 1
        enter(call)
        await first(call, rest)
        if call._reached != handled:
            await _never_called_next(call, middleware)
        return call._sent

    return stream
