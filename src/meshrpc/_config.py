"""The one validated, frozen configuration object, and its readers at the edge.

Settings come from code (``Config(...)``), then ``MESHRPC_*`` environment
variables, then command-line flags; the last one wins.  Only `from_env`
and the CLI read the outside world; everything else receives a ``Config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union
from urllib.parse import urlsplit

from ._errors import ConfigError

# Seconds a process meshrpc runs gets past drain delay + grace + shutdown timeout to end:
# leftover tasks and threads are given what is left of it, then abandoned.
EXIT_MARGIN = 2.0

ENV_PREFIX = "MESHRPC_"
MeshMode = Literal["auto", "istio-sidecar", "ambient", "none"]
MESH_MODES: tuple[str, ...] = typing.get_args(MeshMode)
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("off", "text", "json")
MiB = 1024 * 1024


def _setting(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a meshrpc server can be told.  Validated once, when created.

    Each field is a setting, given in code (``Config(port=8080)``), as a ``MESHRPC_*``
    variable or as a ``meshrpc serve`` flag; [configuration](configuration.md) lists
    every one with its variable, flag, default and meaning.
    """

    host: str = _setting(
        "127.0.0.1",
        "Address to listen on: this machine only by default; '[::]' (every IPv4 and IPv6 address) "
        "inside Kubernetes, where the sidecar and the kubelet reach the pod's own address.",
    )
    port: int = _setting(50051, "TCP port to listen on (0 picks a free one).")
    reuse_port: bool = _setting(
        False,
        "Allow several servers on one port (SO_REUSEPORT). Off, so a port in use is an error.",
    )
    tls_cert_file: str | None = _setting(
        None,
        "PEM certificate chain to serve TLS with (and tls_key_file). Unset: plaintext, as behind a sidecar.",
    )
    tls_key_file: str | None = _setting(None, "PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = _setting(
        None,
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS). Needs tls_cert_file.",
    )
    max_receive_message_size: int = _setting(4 * MiB, "Largest request message accepted, in bytes.")
    max_send_message_size: int = _setting(4 * MiB, "Largest response message sent, in bytes.")
    max_concurrent_rpcs: int | None = _setting(
        None,
        "RPCs served at once; beyond it new ones get RESOURCE_EXHAUSTED. Unset: no limit.",
    )
    overload_target_delay: float | None = _setting(
        0.05,
        "Seconds of queueing on the event loop tolerated before new calls are shed (UNAVAILABLE, before their "
        "handler runs), more of them the longer it stays over. Unset: never shed.",
    )
    min_time_remaining: float = _setting(
        0.001,
        "Seconds a call must have left before its deadline for its handler to be started; "
        "one with less gets DEADLINE_EXCEEDED without running anything.",
    )
    thread_pool_size: int = _setting(
        16,
        "Threads that run 'def' handlers; more concurrent sync calls wait for a free thread.",
    )
    reflection: bool = _setting(True, "Serve gRPC server reflection (v1 and v1alpha).")
    drain_delay: float = _setting(
        5.0,
        "Seconds to keep serving after SIGTERM while readiness reports NOT_SERVING.",
    )
    grace: float = _setting(20.0, "Seconds in-flight RPCs get to finish once the server stops accepting.")
    shutdown_timeout: float = _setting(
        4.0,
        "Seconds the lifespan's shutdown may take after the drain; past it the process exits with code 1.",
    )
    health_check_interval: float = _setting(5.0, "Seconds between runs of the readiness checks.")
    health_check_timeout: float = _setting(2.0, "Seconds one readiness check may take before it counts as failed.")
    liveness_service: str = _setting(
        "liveness",
        "Health service name that stays SERVING while the process lives (liveness probe).",
    )
    mesh: MeshMode = _setting("auto", "Mesh mode: auto, istio-sidecar, ambient or none.")
    pod_annotations_path: str = _setting(
        "/etc/podinfo/annotations",
        "Downward-API file with the pod's annotations, read when mesh is auto.",
    )
    sidecar_ready_url: str = _setting(
        "http://127.0.0.1:15021/healthz/ready",
        "The Istio sidecar's readiness endpoint.",
    )
    sidecar_ready_timeout: float = _setting(
        120.0,
        "Seconds to wait for the sidecar to be ready before exiting with an error.",
    )
    sidecar_quit_url: str = _setting(
        "http://127.0.0.1:15020/quitquitquit",
        "Where a finished batch app asks the sidecar to exit.",
    )
    max_connection_age: float | None = _setting(
        None,
        "Seconds before a client connection is asked to reconnect. Unset: 300, off with a sidecar.",
    )
    max_connection_age_grace: float = _setting(30.0, "Seconds a connection past its age gets for its in-flight RPCs.")
    telemetry: bool = _setting(
        True, "Trace and measure every RPC when an OpenTelemetry SDK is configured (free when none is)."
    )
    metrics_port: int | None = _setting(
        None,
        "Serve Prometheus metrics at http://HOST:PORT/metrics. Unset: off.",
    )
    otel_sdk: bool = _setting(False, "Set up the OpenTelemetry SDK from the OTEL_* variables (needs the 'otel' extra).")
    access_log: str = _setting("off", "One log line per RPC: off, text or json.")
    access_log_sample_rate: float = _setting(1.0, "Fraction of RPCs the access log writes (0..1).")
    log_level: str = _setting("info", "Log level: debug, info, warning or error.")

    def __post_init__(self) -> None:
        _check_types(self)
        # Levels are names, not case-sensitive words: DEBUG and debug mean the same.
        object.__setattr__(self, "log_level", self.log_level.lower())
        _require(self.host != "", "host", "must not be empty")
        _require(0 <= self.port <= 65535, "port", f"must be 0..65535, got {self.port}")
        for name in ("max_receive_message_size", "max_send_message_size"):
            value = getattr(self, name)
            _require(value > 0, name, f"must be a positive number of bytes, got {value}")
        if self.metrics_port is not None:
            _require(0 <= self.metrics_port <= 65535, "metrics_port", f"must be 0..65535, got {self.metrics_port}")
            _require(
                self.metrics_port == 0 or self.metrics_port != self.port,
                "metrics_port",
                f"must differ from the gRPC port {self.port}",
            )
        _require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file",
            "tls_cert_file and tls_key_file go together: set both or neither",
        )
        _require(
            self.tls_client_ca_file is None or self.tls_cert_file is not None,
            "tls_client_ca_file",
            "client certificates need the server's own TLS: set tls_cert_file and tls_key_file too",
        )
        _require(
            self.thread_pool_size > 0,
            "thread_pool_size",
            f"must be a positive number of threads, got {self.thread_pool_size}",
        )
        if self.max_concurrent_rpcs is not None:
            _require(
                self.max_concurrent_rpcs > 0,
                "max_concurrent_rpcs",
                "must be positive or unset",
            )
        for name in ("drain_delay", "grace", "max_connection_age_grace"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and value >= 0,
                name,
                f"must be >= 0 seconds, got {value}",
            )
        for name in (
            "health_check_interval",
            "health_check_timeout",
            "sidecar_ready_timeout",
            "shutdown_timeout",
        ):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and value > 0,
                name,
                f"must be > 0 seconds, got {value}",
            )
        if self.overload_target_delay is not None:
            _require(
                math.isfinite(self.overload_target_delay) and self.overload_target_delay > 0,
                "overload_target_delay",
                f"must be > 0 seconds or unset, got {self.overload_target_delay}",
            )
        _require(
            math.isfinite(self.min_time_remaining) and self.min_time_remaining >= 0,
            "min_time_remaining",
            f"must be >= 0 seconds, got {self.min_time_remaining}",
        )
        if self.max_connection_age is not None:
            _require(
                math.isfinite(self.max_connection_age) and self.max_connection_age > 0,
                "max_connection_age",
                f"must be > 0 seconds or unset, got {self.max_connection_age}",
            )
        _require(
            self.liveness_service != "",
            "liveness_service",
            "must not be empty ('' is readiness)",
        )
        _require(
            self.mesh in MESH_MODES,
            "mesh",
            f"must be one of {', '.join(MESH_MODES)}, got {self.mesh!r}",
        )
        _require(
            self.log_level in LOG_LEVELS,
            "log_level",
            f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}",
        )
        _require(
            self.access_log in ACCESS_LOG_FORMATS,
            "access_log",
            f"must be one of {', '.join(ACCESS_LOG_FORMATS)}, got {self.access_log!r}",
        )
        _require(
            0.0 <= self.access_log_sample_rate <= 1.0,
            "access_log_sample_rate",
            f"must be 0..1, got {self.access_log_sample_rate}",
        )
        for name in ("sidecar_ready_url", "sidecar_quit_url"):
            value = getattr(self, name)
            _require(_is_http_url(value), name, f"must be an http://HOST[:PORT]/PATH URL, got {value!r}")

    @property
    def exit_budget(self) -> float:
        """Seconds from the first stop signal to the process's exit, at most: drain delay +
        grace + shutdown timeout + `EXIT_MARGIN` for the last leftovers."""
        return self.drain_delay + self.grace + self.shutdown_timeout + EXIT_MARGIN

    @property
    def address(self) -> str:
        """The ``host:port`` string the server binds."""
        return f"{self.host}:{self.port}"

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated again."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_types(config: Config) -> None:
    """Each setting has its declared type (ints are accepted as floats, and made floats)."""
    for name, hint in _HINTS.items():
        value = getattr(config, name)
        optional = typing.get_origin(hint) in (Union, types.UnionType)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        if optional and value is None:
            continue
        if typing.get_origin(base) is Literal:
            base = str
        ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, name, float(value))
            ok = True
        if not ok:
            expected = _TYPE_NAMES[base] + (" or None" if optional else "")
            raise ConfigError(
                f"invalid setting {_where(name)}: must be {expected}, got {type(value).__name__} {value!r}"
            )


def _where(name: str) -> str:
    return f"{name} ({env_name(name)} / --{name.replace('_', '-')})"


def _is_http_url(value: str) -> bool:
    """An ``http://`` URL with a host and, if any, a port in 1..65535 (what the tiny HTTP client can ask)."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError out of range
    except ValueError:
        return False
    return parts.scheme == "http" and bool(parts.hostname) and (port is None or port > 0)


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"invalid setting {_where(name)}: {problem}")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def settings() -> tuple[dataclasses.Field[Any], ...]:
    """The fields of [`Config`][meshrpc.Config], in declaration order (for the CLI and docs)."""
    return dataclasses.fields(Config)


_HINTS = typing.get_type_hints(Config)


_SECONDS = frozenset(
    {"drain_delay", "grace", "max_connection_age", "max_connection_age_grace", "health_check_interval"}
)


def parse_value(field_name: str, text: str) -> Any:
    """Turn the text of an environment variable or CLI flag into a setting's value."""
    hint = _HINTS[field_name]
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    raw = text.strip()
    if optional and raw.lower() in ("", "none", "off"):
        return None
    if raw == "":
        raise ConfigError(f"invalid setting {_where(field_name)}: the value is empty")
    try:
        if hint is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        wanted = {
            bool: "true or false",
            int: "a whole number",
            float: "a number of seconds" if "timeout" in field_name or field_name in _SECONDS else "a number",
        }[hint]
        raise ConfigError(f"invalid setting {_where(field_name)}: wants {wanted}, got {text!r}") from None
    return raw


# MESHRPC_* variables that are not settings but are read elsewhere at the edge.
OTHER_VARIABLES = frozenset({"MESHRPC_APP"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``MESHRPC_*`` variable that is no setting, naming the close match."""
    known = {env_name(f.name) for f in settings()} | OTHER_VARIABLES
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a meshrpc setting and is ignored{hint}")
    return warnings


POD_HOST = "[::]"


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as ``MESHRPC_*`` variables in ``environ``, parsed.

    Inside Kubernetes (``KUBERNETES_SERVICE_HOST``, which the kubelet sets in every
    container) the host defaults to every address: the sidecar forwards calls to the
    pod's own address and the kubelet probes it there, so a loopback-only server would
    be unreachable.  ``MESHRPC_HOST`` still wins.
    """
    changes: dict[str, Any] = {}
    if "KUBERNETES_SERVICE_HOST" in environ:
        changes["host"] = POD_HOST
    for f in settings():
        name = env_name(f.name)
        if name in environ:
            changes[f.name] = parse_value(f.name, environ[name])
    return changes
