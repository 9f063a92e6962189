"""Turn a registered method into a grpc.aio method handler, composed once.

Everything that wraps a user's handler (status mapping, request validation) is
decided here at registration, so an RPC pays for one coroutine frame and a
``try`` block, not for a chain of interceptors looked up per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ._errors import AppError
from ._failures import HANDLER_ERRORS, fail, wrong_reply
from ._middleware import Middleware, applicable, compose, replies_written
from ._rpc_context import current_rpc
from ._service import MethodSpec, RpcKind
from ._sync import adapt, is_sync
from ._telemetry import Begin, Observation, Observe

Handler = Callable[..., Any]


class InFlight:
    """The RPCs of the app's own services being served, and an optional limit on them.

    The limit is meshrpc's rather than grpc core's ``maximum_concurrent_rpcs``, which
    counts every RPC: with it, slow calls could make the health service answer
    RESOURCE_EXHAUSTED and a liveness probe restart a healthy pod.
    """

    __slots__ = ("cancelled", "count", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.count = 0
        self.limit = limit if limit is not None else 1 << 62
        self.cancelled = 0  # cancelled handlers since the last reset (the drain counts them)


class _Malformed:
    """What the deserializer returns for bytes that do not parse as the request."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _malformed_reason(spec: MethodSpec) -> str:
    return f"request is not a valid {spec.request_type.DESCRIPTOR.full_name}"


def _deserializer(spec: MethodSpec) -> Callable[[bytes], Any]:
    parse = spec.request_type.FromString
    reason = _malformed_reason(spec)

    # grpc.aio answers a deserializer's exception with UNKNOWN and the exception's
    # text; a bad body is the client's fault, so the handler answers INVALID_ARGUMENT.
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _Malformed(reason)

    return deserialize


async def _refuse(
    context: grpc.aio.ServicerContext[Any, Any], begin: Begin | None, code: grpc.StatusCode, details: str
) -> None:
    """Answer ``code`` before the handler runs, observed as any RPC is (a span, the
    metrics, an access-log line): shed load and bad input are when operators look."""
    obs = begin(context) if begin is not None else None
    try:
        await context.abort(code, details)
    except grpc.aio.AbortError as exc:
        if obs is not None:
            obs.finish(exc, None)
        raise


async def _over_limit(context: grpc.aio.ServicerContext[Any, Any], inflight: InFlight, begin: Begin | None) -> None:
    await _refuse(
        context,
        begin,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the server is serving its limit of {inflight.limit} concurrent RPCs",
    )


def _unimplemented(spec: MethodSpec) -> Handler:
    details = f"method {spec.path} is not implemented"

    async def unimplemented(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, details)

    return unimplemented


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any], obs: Observation | None
) -> AsyncIterator[Any]:
    # One generator over a client's stream: malformed messages answered, messages counted.
    async for request in requests:
        if request.__class__ is _Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if obs is not None:
            obs.received += 1
        yield request


def _wrap(
    spec: MethodSpec,
    impl: Handler,
    inflight: InFlight,
    observe: Observe | None,
    chained: bool,
    intercepted: bool,
    parse: Callable[[bytes], Any] | None,
) -> Handler:
    """``impl`` with meshrpc's outer layer: checks, in-flight count, error mapping, telemetry.

    Telemetry is a begin/finish pair called here, not a layer of its own: it sees the
    status the client gets (a wrong reply type included) and adds no coroutine frame,
    and no generator per streamed message.  ``chained``: ``impl`` is the middleware
    chain, which writes (and counts) a stream's replies itself.  ``intercepted``: the
    server has grpc.aio interceptors, so a stream's handler must be an async generator
    (they wrap it so).  ``parse``: the request comes as bytes, for this layer to parse.
    The three shapes below repeat one prologue inline, on purpose: a shared helper
    would be one more coroutine call per RPC, which is what the prologue costs.
    """
    kind = spec.kind
    abort_error = grpc.aio.AbortError
    cancelled_error = asyncio.CancelledError
    # Each RPC runs in its own task: setting the variable needs no reset.
    enter = current_rpc.set
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    reply_class = spec.response_type
    begin = observe(spec) if observe is not None else None
    malformed = _malformed_reason(spec)

    if kind in (RpcKind.UNARY_UNARY, RpcKind.STREAM_UNARY):
        streaming_requests = kind is RpcKind.STREAM_UNARY

        async def replying(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            enter(context)
            if parse is not None:
                try:
                    request = parse(request)
                except DecodeError:
                    await _refuse(context, begin, invalid, malformed)
            elif request.__class__ is _Malformed:  # a unary request only: a stream's are checked as read
                await _refuse(context, begin, invalid, request.reason)
            if inflight.count >= inflight.limit:
                await _over_limit(context, inflight, begin)
            inflight.count += 1
            obs = begin(context) if begin is not None else None
            error: BaseException | None = None
            try:
                reply = await impl(_checked(request, context, obs) if streaming_requests else request, context)
                if reply.__class__ is not reply_class and not isinstance(reply, reply_class):
                    await wrong_reply(context, spec, reply)
                return reply
            except abort_error as exc:
                error = exc
                raise
            except cancelled_error as exc:
                error = exc
                inflight.cancelled += 1
                raise
            except HANDLER_ERRORS as exc:
                error = exc
                await fail(context, spec, exc)
            finally:
                inflight.count -= 1
                if obs is not None:
                    obs.finish(error, None)

        _WRAPPERS.add(replying.__code__)
        return replying

    def first_arg(request: Any, context: grpc.aio.ServicerContext[Any, Any], obs: Observation | None) -> Any:
        return request if kind is RpcKind.UNARY_STREAM else _checked(request, context, obs)

    if inspect.isasyncgenfunction(impl):
        # The user's generator is driven here and each reply written with
        # context.write, rather than re-yielded to grpc through a second generator.
        # The wrapper is a coroutine: grpc awaits it, and a write that waits for the
        # transport suspends through one frame of meshrpc's, not through an async
        # generator's as well (8 to 29 µs per 10-message stream under load).
        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            enter(context)
            if parse is not None:
                try:
                    request = parse(request)
                except DecodeError:
                    await _refuse(context, begin, invalid, malformed)
            elif request.__class__ is _Malformed:
                await _refuse(context, begin, invalid, request.reason)
            if inflight.count >= inflight.limit:
                await _over_limit(context, inflight, begin)
            inflight.count += 1
            obs = begin(context) if begin is not None else None
            error: BaseException | None = None
            write = context.write
            sent = 0
            try:
                async for reply in impl(first_arg(request, context, obs), context):
                    if reply.__class__ is not reply_class and not isinstance(reply, reply_class):
                        await wrong_reply(context, spec, reply)
                    await write(reply)
                    sent += 1
            except abort_error as exc:
                error = exc
                raise
            except cancelled_error as exc:
                error = exc
                inflight.cancelled += 1
                raise
            except HANDLER_ERRORS as exc:
                error = exc
                await fail(context, spec, exc)
            finally:
                inflight.count -= 1
                if obs is not None:
                    obs.finish(error, replies_written() if chained else sent)

        _WRAPPERS.add(streaming.__code__)
        return _as_generator(streaming) if intercepted else streaming

    # A coroutine that writes its replies with context.write(): meshrpc does not see them.
    async def writing(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        enter(context)
        if parse is not None:
            try:
                request = parse(request)
            except DecodeError:
                await _refuse(context, begin, invalid, malformed)
        elif request.__class__ is _Malformed:
            await _refuse(context, begin, invalid, request.reason)
        if inflight.count >= inflight.limit:
            await _over_limit(context, inflight, begin)
        inflight.count += 1
        obs = begin(context) if begin is not None else None
        error: BaseException | None = None
        try:
            await impl(first_arg(request, context, obs), context)
        except abort_error as exc:
            error = exc
            raise
        except cancelled_error as exc:
            error = exc
            inflight.cancelled += 1
            raise
        except HANDLER_ERRORS as exc:
            error = exc
            await fail(context, spec, exc)
        finally:
            inflight.count -= 1
            if obs is not None:
                obs.finish(error, None)

    _WRAPPERS.add(writing.__code__)
    return writing


_WRAPPERS: set[Any] = set()  # the code objects of the wrappers above, for running_rpcs()


def running_rpcs() -> list[str]:
    """The methods of the RPCs whose handlers are still running, found by their wrappers'
    live coroutines: for the log line that names what an exit abandons.  Slow (a walk
    of every object the collector tracks), so only ever called on that way out."""
    import gc

    found = []
    for obj in gc.get_objects():
        if inspect.iscoroutine(obj) and obj.cr_code in _WRAPPERS and obj.cr_frame is not None:
            spec = obj.cr_frame.f_locals.get("spec")
            if isinstance(spec, MethodSpec):
                found.append(spec.path)
    return sorted(found)


def _as_generator(handler: Handler) -> Handler:
    """A stream's coroutine ``handler`` as an async generator yielding nothing: what
    grpc.aio interceptors expect of a server-streaming handler when they wrap it."""

    async def generating(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await handler(request, context)
        return
        yield

    return generating


_FACTORIES = {
    RpcKind.UNARY_UNARY: grpc.unary_unary_rpc_method_handler,
    RpcKind.UNARY_STREAM: grpc.unary_stream_rpc_method_handler,
    RpcKind.STREAM_UNARY: grpc.stream_unary_rpc_method_handler,
    RpcKind.STREAM_STREAM: grpc.stream_stream_rpc_method_handler,
}


def method_handler(
    spec: MethodSpec,
    inflight: InFlight | None = None,
    *,
    observe: Observe | None = None,
    middleware: tuple[Middleware, ...] = (),
    pool: concurrent.futures.Executor | None = None,
    intercepted: bool = True,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The grpc handler for ``spec``: the user's method inside meshrpc's layers.

    From the inside out: a ``def`` method is run in ``pool``; the user's
    ``middleware`` (those the method did not opt out of); the error mapping, with
    ``observe`` (telemetry) around everything.  ``inflight`` counts (and limits) the
    RPCs; without it, as for health and reflection, nothing is counted or limited.
    ``intercepted``: the server has grpc.aio interceptors, so a stream's handler keeps
    the async-generator shape they wrap, and grpc parses every request because they
    read it; without them a stream's handler is a plain coroutine.
    """
    # A single request is parsed by meshrpc's handler, not by a deserializer grpc calls:
    # one Python function fewer per RPC.  A client stream's messages are parsed by grpc,
    # as context.read() gives them, and so is any request interceptors read first.
    single = spec.kind in (RpcKind.UNARY_UNARY, RpcKind.UNARY_STREAM)
    parse = spec.request_type.FromString if single and not intercepted else None
    chain: tuple[Middleware, ...] = ()
    if spec.impl is None:
        handler = _unimplemented(spec)
    else:
        impl = spec.impl
        if is_sync(impl):
            if pool is None:
                raise AppError(f"{spec.path} is a 'def' handler, but no thread pool was given for it")
            impl = adapt(spec, impl, pool)
        chain = applicable(spec, middleware)
        if chain:
            impl = compose(spec, chain, impl)
        counted = inflight if inflight is not None else InFlight()
        handler = _wrap(spec, impl, counted, observe, bool(chain), intercepted, parse)
    factory: Any = _FACTORIES[spec.kind]
    result: grpc.RpcMethodHandler[Any, Any] = factory(
        handler,
        request_deserializer=None if parse is not None else _deserializer(spec),
        response_serializer=spec.response_type.SerializeToString,
    )
    return result
