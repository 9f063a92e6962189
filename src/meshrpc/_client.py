"""Outbound channels with meshrpc's defaults: ``meshrpc.channel("dns:///orders:50051")``.

Without a sidecar the client balances itself: ``round_robin`` over every address
the target resolves to (a headless Service gives one per pod), client-side health
checking so a draining replica (readiness NOT_SERVING) gets no new calls, and a
bounded retry of UNAVAILABLE through gRPC's service config.  With an Istio
sidecar, Envoy balances each request, so the channel keeps one connection to it
(``pick_first``) and its first call waits until the sidecar is ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grpc

from . import _mesh
from ._outbound import CallDetailsInterceptor, OutboundInterceptor


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy (gRFC A6): which codes, how many attempts, what backoff."""

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 1.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE",)

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 2..5 (gRPC caps it at 5), got {self.max_attempts}")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff or self.backoff_multiplier <= 0:
            raise ValueError("backoffs must be > 0 with max_backoff >= initial_backoff")
        codes = {c.name for c in grpc.StatusCode}
        unknown = [c for c in self.retryable_status_codes if c not in codes]
        if unknown or not self.retryable_status_codes:
            raise ValueError(f"retryable_status_codes must be gRPC status names, got {unknown or '()'}")

    def to_json(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff}s",
            "maxBackoff": f"{self.max_backoff}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }


# Keepalive within what Envoy and grpc servers accept by default (grpc servers answer
# pings more often than every 5 minutes without calls with GOAWAY too_many_pings).
KEEPALIVE_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)


def service_config(mesh: str, retry: RetryPolicy | None, health_check: bool) -> dict[str, Any]:
    """The gRPC service config the channel uses (see gRFC A2, A6, A17)."""
    config: dict[str, Any] = {}
    if mesh != _mesh.SIDECAR:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        if health_check:
            config["healthCheckConfig"] = {"serviceName": ""}
    if retry is not None:
        config["methodConfig"] = [{"name": [{}], "retryPolicy": retry.to_json()}]
    return config


class _SidecarGate(CallDetailsInterceptor):
    """Holds calls until the sidecar is ready (once per channel, bounded)."""

    def __init__(self, url: str, timeout: float) -> None:
        self._url, self._timeout = url, timeout
        self._ready: asyncio.Future[None] | None = None

    async def prepare(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self._ready is None:
            self._ready = asyncio.ensure_future(_mesh.wait_for_sidecar(self._url, self._timeout))
        await asyncio.shield(self._ready)
        return details


def channel(
    target: str,
    *,
    mesh: str | None = None,
    retry: RetryPolicy | None = RetryPolicy(),
    health_check: bool = True,
    propagate_trace: bool = True,
    propagate_deadline: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
    sidecar_ready_url: str | None = None,
    sidecar_ready_timeout: float | None = None,
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` with meshrpc's defaults (an async context manager).

    ``mesh``: "istio-sidecar", "ambient" or "none"; by default the mode of the meshrpc
    server running in this process, else "none".  ``retry=None`` turns retries off;
    ``options`` are added last, so they override meshrpc's.  The sidecar's readiness URL
    and wait default to the running server's settings (``sidecar_ready_url``,
    ``sidecar_ready_timeout``: 120 s unless configured).
    """
    server_mesh = _mesh.current() or _mesh.MeshInfo(_mesh.NONE, "no meshrpc server in this process")
    mode = mesh or server_mesh.mode
    config = service_config(mode, retry, health_check)
    all_options: list[tuple[str, Any]] = [
        *KEEPALIVE_OPTIONS,
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", json.dumps(config, sort_keys=True)),
        *options,
    ]
    chain: list[Any] = []
    if mode == _mesh.SIDECAR:
        chain.append(
            _SidecarGate(
                sidecar_ready_url or server_mesh.sidecar_ready_url,
                sidecar_ready_timeout if sidecar_ready_timeout is not None else server_mesh.sidecar_ready_timeout,
            )
        )
    if propagate_trace or propagate_deadline:
        chain.append(OutboundInterceptor(propagate_trace=propagate_trace, propagate_deadline=propagate_deadline))
    chain.extend(interceptors)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=all_options, interceptors=chain)
    return grpc.aio.insecure_channel(target, options=all_options, interceptors=chain)
