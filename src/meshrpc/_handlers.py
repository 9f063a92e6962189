"""Turn a registered method into a grpc.aio method handler, composed once.

Everything that wraps a user's handler (status mapping, request validation) is
decided here at registration, so an RPC pays for one coroutine frame and a
``try`` block, not for a chain of interceptors looked up per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import inspect
from collections.abc import AsyncIterator, Callable
from random import random
from time import perf_counter
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ._aggregates import BATCH
from ._errors import AppError
from ._failures import HANDLER_ERRORS, fail, wrong_reply
from ._middleware import Middleware, applicable, compose
from ._overload import COST_WEIGHT, LoadShedder, Refusal
from ._rpc_context import call_details, current_rpc, metadata_key
from ._sampling import LOW_64, Dropped, dropped_span, getrandbits, new_dropped
from ._service import MethodSpec, RpcKind
from ._sync import adapt, is_sync
from ._telemetry import Begin, Lane, Observation, Observe, lane_of

Handler = Callable[..., Any]


class InFlight:
    """Admission for the app's own services: the RPCs being served, an optional limit on
    them, and the overload shedder (which also knows how much time a call must have left).

    The limit is meshrpc's rather than grpc core's ``maximum_concurrent_rpcs``, which
    counts every RPC: with it, slow calls could make the health service answer
    RESOURCE_EXHAUSTED and a liveness probe restart a healthy pod.
    """

    __slots__ = ("cancelled", "count", "limit", "shedder")

    def __init__(self, limit: int | None = None, *, shedder: LoadShedder | None = None) -> None:
        self.count = 0
        self.limit = limit if limit is not None else 1 << 62
        self.cancelled = 0  # cancelled handlers since the last reset (the drain counts them)
        self.shedder = shedder if shedder is not None else LoadShedder(None)


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


def _turned_away(context: grpc.aio.ServicerContext[Any, Any], begin: Begin | None, refused: Refusal) -> None:
    """Answer a refusal before the handler runs, the cheapest way grpc.aio has (a status
    set and the handler returning None: no exception, nothing serialized), observed as
    any RPC is."""
    obs = begin(context) if begin is not None else None
    context.set_code(refused[0])
    context.set_details(refused[1])
    if obs is not None:
        obs.finish(None, None)


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
        if type(request) is _Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if obs is not None:
            obs.received += 1
        yield request


_WRAPPERS: set[Any] = set()  # the code objects of the wrappers below, for running_rpcs()


class _Outer:
    """What every wrapper shape below needs, worked out once per method."""

    __slots__ = ("begin", "inflight", "lane", "malformed", "parse", "reply_class", "spec")

    def __init__(
        self, spec: MethodSpec, inflight: InFlight, observe: Observe | None, parse: Callable[[bytes], Any] | None
    ) -> None:
        self.spec = spec
        self.inflight = inflight
        self.begin = observe(spec) if observe is not None else None
        self.lane = lane_of(observe, spec) if observe is not None else None
        self.parse = parse  # the request comes as bytes, for the wrapper to parse
        self.malformed = _malformed_reason(spec)
        self.reply_class = spec.response_type


# meshrpc's outer layer around a method: request checks, the in-flight count, error
# mapping and telemetry, in one wrapper for every shape of RPC (see `_Shape`), read top to
# bottom.  Telemetry is a begin/finish pair called inline, not a layer of its own: it sees
# the status the client gets (a wrong reply type included) and adds no coroutine frame,
# and no generator per streamed message.  Each RPC runs in its own task, so setting
# current_rpc needs no reset.  A message's class is read with ``type()``, not
# ``.__class__``: a protobuf (upb) message looks an attribute's name up among its fields
# first, 37 ns against 15 (once per request and per reply).


class _Shape(enum.Enum):
    """How the wrapper gets the replies from the method it wraps."""

    SINGLE = "single"  # unary and client-streaming: ``impl`` returns the one reply
    # Server-streaming and bidirectional, ``impl`` an async generator: driven by the wrapper,
    # each reply written with ``context.write``, not re-yielded to grpc through a generator
    # of meshrpc's (a write that waits for the transport suspends through one frame, not two).
    ITERATED = "iterated"
    # Server-streaming and bidirectional, ``impl`` a coroutine that writes the replies itself
    # and returns how many it wrote (the middleware chain), or None when that is not known
    # (a handler using ``context.write``).
    DELEGATED = "delegated"


def _wrapped(outer: _Outer, impl: Handler, shape: _Shape) -> Handler:
    """``impl`` inside meshrpc's outer layer.  A unary or server-streaming method with a lane
    (see _telemetry.Lane) observes the calls that go as most do inline, here."""
    spec, inflight, begin, parse, malformed, reply_class = (
        outer.spec, outer.inflight, outer.begin, outer.parse, outer.malformed, outer.reply_class,
    )  # fmt: skip
    single, iterated = shape is _Shape.SINGLE, shape is _Shape.ITERATED
    streaming_requests = spec.kind in (RpcKind.STREAM_UNARY, RpcKind.STREAM_STREAM)
    enter, invalid = current_rpc.set, grpc.StatusCode.INVALID_ARGUMENT
    abort_error, cancelled_error = grpc.aio.AbortError, asyncio.CancelledError
    shedder = inflight.shedder
    admit, budget = shedder.admission()
    lane = outer.lane
    in_lane = lane is not None
    if lane is not None:
        method, path, fields, ok_calls, aggregates, rate, timed = (
            lane.method, lane.path, lane.fields, lane.ok_calls, lane.aggregates, lane.rate, lane.timed,
        )  # fmt: skip
        presampler = lane.presampler
        traced = presampler is not None
        if presampler is not None:
            bound, flags, span_id = presampler.bound, presampler.new_trace_flags, presampler.span_id
        details_of, behind, set_behind, absent = call_details.get, dropped_span.get, dropped_span.set, Lane.ABSENT
        adopted = Observation.adopted

    async def serving(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        enter(context)
        # Admission first, before any parsing: what is refused here costs the least.
        remaining = context.time_remaining()
        if shedder.share or remaining is not None:  # else nothing can refuse it: no call
            refused = admit(remaining)
            if refused is not None:
                return _turned_away(context, begin, refused)
        if parse is not None:
            try:
                request = parse(request)
            except DecodeError:
                await _refuse(context, begin, invalid, malformed)
        elif type(request) is _Malformed:  # a single request only: a stream's are checked as read
            await _refuse(context, begin, invalid, request.reason)
        if inflight.count >= inflight.limit:
            await _over_limit(context, inflight, begin)
        inflight.count += 1
        cost_from = perf_counter() if shedder.saturated else 0.0  # what a handler costs, learnt under load
        obs: Observation | None = None
        span: Dropped | None = None
        if in_lane:
            # The lane: Observation.__init__'s steps for a new trace the ratio drops, inline.
            start = perf_counter() if timed else 0.0
            if traced:
                details = details_of(None)  # the metadata grpc gave the handler lookup (see request_metadata)
                metadata = (
                    details.invocation_metadata if details is not None and details.method == path
                    else context.invocation_metadata()
                )  # fmt: skip
                # A caller's trace context (any of the propagator's headers): the Observation reads it.
                trace_id = getrandbits(128) if fields.isdisjoint(map(metadata_key, metadata or ())) else 0
                if trace_id and (trace_id & LOW_64) >= bound and behind(absent) is not absent:
                    span = new_dropped(Dropped)
                    span.parts = (trace_id, flags, None, span_id)
                    set_behind(span)
                else:
                    obs = Observation(method, context, trace_id)  # sampled with this id, or a caller's trace
            if obs is None and ok_calls is not None:
                method.active += 1
        elif begin is not None:
            obs = begin(context)
        error: BaseException | None = None
        sent: Any = 0 if iterated else None  # a server stream's replies (None: not known)
        try:
            requests = _checked(request, context, obs) if streaming_requests else request
            if single:
                reply = await impl(requests, context)
                if type(reply) is not reply_class and not isinstance(reply, reply_class):
                    await wrong_reply(context, spec, reply)
                return reply
            if iterated:
                write = context.write
                async for reply in impl(requests, context):
                    if type(reply) is not reply_class and not isinstance(reply, reply_class):
                        await wrong_reply(context, spec, reply)
                    await write(reply)
                    sent += 1
            else:
                sent = await impl(requests, context)
                if sent.__class__ is not int:
                    sent = None
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
            if cost_from:  # what a handler costs, averaged (see Budget)
                budget.cost += (perf_counter() - cost_from - budget.cost) * COST_WEIGHT
            if obs is not None:
                obs.finish(error, sent)
            elif in_lane:
                if error is not None or context.code() is not None:
                    adopted(method, context, start, span).finish(error, sent)
                elif rate and random() < rate:  # the access log's draw, made once
                    adopted(method, context, start, span).finish(None, sent, logged=True)
                elif ok_calls is not None:  # ended OK, no log line: Observation.finish's steps for such a call
                    method.active -= 1
                    elapsed_ms = (perf_counter() - start) * 1000
                    ok_calls.append(elapsed_ms if single else (elapsed_ms, sent))
                    if len(ok_calls) >= BATCH:
                        assert aggregates is not None  # the queue's (see _Method.ok_calls)
                        aggregates.aggregate_batch()
        return None

    _WRAPPERS.add(serving.__code__)
    return serving


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
    if spec.impl is None:
        handler = _unimplemented(spec)
    else:
        impl = spec.impl
        if is_sync(impl):
            if pool is None:
                raise AppError(f"{spec.path} is a 'def' handler, but no thread pool was given for it")
            impl = adapt(spec, impl, pool, inflight.shedder if inflight is not None else None)
        chain = applicable(spec, middleware)
        if chain:
            impl = compose(spec, chain, impl)  # a stream's chain writes the replies and counts them
        outer = _Outer(spec, inflight if inflight is not None else InFlight(), observe, parse)
        if spec.kind in (RpcKind.UNARY_UNARY, RpcKind.STREAM_UNARY):
            shape = _Shape.SINGLE
        else:
            shape = _Shape.ITERATED if inspect.isasyncgenfunction(impl) else _Shape.DELEGATED
        handler = _wrapped(outer, impl, shape)
        if intercepted and spec.kind in (RpcKind.UNARY_STREAM, RpcKind.STREAM_STREAM):
            handler = _as_generator(handler)  # grpc.aio interceptors wrap a stream's handler as a generator
    factory: Any = _FACTORIES[spec.kind]
    result: grpc.RpcMethodHandler[Any, Any] = factory(
        handler,
        request_deserializer=None if parse is not None else _deserializer(spec),
        response_serializer=spec.response_type.SerializeToString,
    )
    return result
