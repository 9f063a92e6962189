"""meshrpc: asyncio gRPC services for Kubernetes and Istio.

Subclass the generated servicer, put it in an [`App`][meshrpc.App], and ``meshrpc serve``
gives it health, reflection, a zero-loss drain and mesh-aware readiness;
``meshrpc routes`` writes its Kubernetes and Istio manifests.
"""

from ._app import App, Lifespan
from ._caller import Caller, caller
from ._client import RetryPolicy, channel
from ._config import Config
from ._details import error_details
from ._errors import (
    Aborted,
    AlreadyExists,
    AppError,
    BindError,
    Cancelled,
    ConfigError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshrpcError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    StatusError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from ._mesh import SidecarNotReady, quit_sidecar, wait_for_sidecar
from ._middleware import Call, CallNext, Middleware, current_call, skip_middleware
from ._outbound import OutboundInterceptor, outgoing_metadata
from ._route_options import RouteOptions, route
from ._server import Server
from ._service import Service
from ._telemetry import TraceContextFilter
from ._version import __version__

__all__ = [
    "Aborted",
    "AlreadyExists",
    "App",
    "AppError",
    "BindError",
    "Call",
    "CallNext",
    "Caller",
    "Cancelled",
    "Config",
    "ConfigError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Lifespan",
    "MeshrpcError",
    "Middleware",
    "NotFound",
    "OutOfRange",
    "OutboundInterceptor",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "RouteOptions",
    "Server",
    "Service",
    "SidecarNotReady",
    "StatusError",
    "TraceContextFilter",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "caller",
    "channel",
    "current_call",
    "error_details",
    "outgoing_metadata",
    "quit_sidecar",
    "route",
    "skip_middleware",
    "wait_for_sidecar",
]
