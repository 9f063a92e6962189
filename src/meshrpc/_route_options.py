"""Route options declared in code: timeouts and retries that ``meshrpc routes`` writes."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ._errors import AppError

T = TypeVar("T")

# The retry conditions Envoy accepts in x-envoy-retry-on / x-envoy-retry-grpc-on,
# which is what Istio's retryOn becomes.  The CRD schema takes any string, so a
# typo would otherwise reach production silently.
GRPC_RETRY_ON = frozenset({"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})
HTTP_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
    }
)
RETRY_ON = GRPC_RETRY_ON | HTTP_RETRY_ON

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | str, what: str) -> float:
    """Seconds from a number of seconds or a string such as ``"1.5s"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise AppError(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(value.strip())
        if not match:
            raise AppError(f"{what}: {value!r} is not a duration (use e.g. 2.5, '2.5s' or '250ms')")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise AppError(f"{what}: a duration must be > 0, got {value!r}")
    if seconds * 1000 != round(seconds * 1000):
        raise AppError(f"{what}: {value!r} is finer than a millisecond")
    return seconds


@dataclasses.dataclass(frozen=True)
class RouteOptions:
    """How the mesh routes calls to a service or a method (all optional)."""

    timeout: float | None = None
    retries: int | None = None
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()


def route(
    *,
    timeout: float | str | None = None,
    retries: int | None = None,
    per_try_timeout: float | str | None = None,
    retry_on: Iterable[str] | None = None,
) -> Callable[[T], T]:
    """Declare the mesh's timeout and retries for a service class or one method.

    ``meshrpc routes`` turns them into the VirtualService (or GRPCRoute): on a
    class they apply to the service's prefix route, on a method to an exact route
    for that method ahead of it.  Bad values fail when the app is imported.
    """

    def decorate(target: T) -> T:
        what = f"@meshrpc.route on {getattr(target, '__qualname__', target)}"
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise AppError(f"{what}: retries must be a whole number >= 0, got {retries!r}")
        conditions = tuple(retry_on) if retry_on is not None else ()
        if isinstance(retry_on, str):
            conditions = tuple(c.strip() for c in retry_on.split(","))
        unknown = [c for c in conditions if c not in RETRY_ON]
        if unknown:
            raise AppError(
                f"{what}: unknown retry condition(s) {', '.join(map(repr, unknown))}; "
                f"gRPC ones are {', '.join(sorted(GRPC_RETRY_ON))}"
            )
        if conditions and not retries:
            raise AppError(f"{what}: retry_on needs retries >= 1")
        options = RouteOptions(
            timeout=parse_duration(timeout, f"{what}: timeout") if timeout is not None else None,
            retries=retries,
            per_try_timeout=(
                parse_duration(per_try_timeout, f"{what}: per_try_timeout") if per_try_timeout is not None else None
            ),
            # Unset: `meshrpc routes` retries what is safe for each method (see its retries).
            retry_on=conditions,
        )
        target.__meshrpc_route__ = options  # type: ignore[attr-defined]
        return target

    return decorate


def route_options(target: Any) -> RouteOptions | None:
    # vars(), not getattr: a class must not inherit its base class's route.
    own = vars(target) if isinstance(target, type) else getattr(target, "__dict__", {})
    options = own.get("__meshrpc_route__")
    return options if isinstance(options, RouteOptions) else None
