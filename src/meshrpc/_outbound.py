"""Outbound calls from inside a handler: trace headers and the deadline go along.

In a mesh, a trace only joins up when every service forwards the trace headers
of the call it is serving to the calls it makes; Istio's Envoys cannot do it for
the app.  [`OutboundInterceptor`][meshrpc.OutboundInterceptor] does it for every call on a channel, and
shortens each call's timeout to what is left of the incoming deadline.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import propagate

from ._rpc_context import current_rpc, incoming_metadata

# Headers Istio asks applications to forward (besides what OpenTelemetry injects).
FORWARDED_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "x-cloud-trace-context",
    "grpc-trace-bin",
)

Metadata = Iterable[tuple[str, str | bytes]]


def outgoing_metadata(metadata: Metadata | None = None) -> list[tuple[str, str | bytes]]:
    """``metadata`` plus the trace context and Istio headers to send on an outbound call.

    The current OpenTelemetry context is injected with the global propagators (so a
    downstream span is a child of this RPC's span); the Istio headers of the RPC being
    served (``x-request-id``, ``b3``/``x-b3-*``, ``traceparent``, ...) are forwarded
    where the propagators did not set them.  Keys the caller passes win.
    """
    result = list(metadata or ())
    present = {key.lower() for key, _ in result}
    injected: dict[str, str] = {}
    propagate.inject(injected)
    for key, value in injected.items():
        if key.lower() not in present:
            result.append((key.lower(), value))
            present.add(key.lower())
    incoming = incoming_metadata()
    for key in FORWARDED_HEADERS:
        if key in incoming and key not in present:
            result.append((key, incoming[key]))
    return result


def remaining_time() -> float | None:
    """Seconds left of the deadline of the RPC being served, or None (no RPC, or no deadline)."""
    context = current_rpc.get(None)
    if context is None:
        return None
    remaining: float | None = context.time_remaining()
    return remaining


class DeadlineExpired(grpc.aio.AioRpcError):
    """A call made after the incoming RPC's deadline passed: failed without going on the wire."""

    def __init__(self, method: str) -> None:
        super().__init__(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=f"the deadline of the RPC being served has passed; {method} was not sent",
        )


class CallDetailsInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """A client interceptor for every RPC kind that only prepares each call's details."""

    async def prepare(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self.prepare(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self.prepare(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self.prepare(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self.prepare(client_call_details), request_iterator)


class OutboundInterceptor(CallDetailsInterceptor):
    """A client interceptor for every RPC kind: forwards trace headers, propagates the deadline.

    ``propagate_trace``: add [`outgoing_metadata`][meshrpc.outgoing_metadata] to every call.
    ``propagate_deadline``: a call made while serving an RPC gets at most the time
    left of that RPC's deadline (an explicit timeout can only shorten it); once the
    deadline has passed, calls fail at once with DEADLINE_EXCEEDED.
    """

    def __init__(self, *, propagate_trace: bool = True, propagate_deadline: bool = True) -> None:
        self.propagate_trace = propagate_trace
        self.propagate_deadline = propagate_deadline

    async def prepare(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return self._details(details)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout
        if self.propagate_deadline:
            remaining = remaining_time()
            if remaining is not None:
                if remaining <= 0:
                    method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
                    raise DeadlineExpired(method)
                timeout = remaining if timeout is None else min(timeout, remaining)
        metadata = details.metadata
        if self.propagate_trace:
            metadata = grpc.aio.Metadata(*outgoing_metadata(tuple(details.metadata or ())))
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )
