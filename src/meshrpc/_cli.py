"""The ``meshrpc`` command: serve, health, routes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _config, _discovery, _logging
from ._app import App
from ._errors import MeshrpcError
from ._version import __version__

PROG = "meshrpc"


def _add_app_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "app",
        nargs="?",
        metavar="MODULE:ATTR",
        help="the meshrpc.App to load; default: $MESHRPC_APP, then [tool.meshrpc] app in ./pyproject.toml",
    )


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override MESHRPC_* variables and the app's code)")
    for field in _config.settings():
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} [env {_config.env_name(field.name)}, default {field.default!r}]"
        if field.type in ("bool", bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, metavar=field.name.upper(), help=help_text)


def _settings_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for field in _config.settings():
        value = getattr(ns, field.name, None)
        if value is None:
            continue
        changes[field.name] = value if isinstance(value, bool) else _config.parse_value(field.name, value)
    return changes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Serve gRPC apps on Kubernetes and Istio, and write their manifests."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve an app: health, reflection and a graceful drain on SIGTERM",
        description="Serve a meshrpc.App until SIGTERM or SIGINT, then drain without losing requests. "
        "Settings: the app's code, then MESHRPC_* variables, then these flags (the last one wins).",
    )
    _add_app_argument(serve)
    _add_setting_flags(serve)

    health = commands.add_parser(
        "health",
        help="check a server's gRPC health: exit 0 SERVING, 1 not serving or unknown, 2 unreachable",
        description="Ask TARGET's grpc.health.v1 service once and print one line. Exit status: 0 when "
        "SERVING, 1 when NOT_SERVING or the service is unknown, 2 when the server cannot be reached.",
    )
    health.add_argument("target", metavar="TARGET", help="host:port of the server, e.g. 127.0.0.1:50051")
    health.add_argument("--service", default="", help="health name to check ('' = the server's readiness)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")

    from ._routes_cli import add_routes_command

    add_routes_command(commands)
    return parser


def _load(ns: argparse.Namespace) -> tuple[str, App]:
    """The app's ``module:attr`` reference (argument, MESHRPC_APP or pyproject.toml) and the App."""
    cwd = Path.cwd()
    reference = _discovery.app_reference(ns.app, os.environ, cwd)
    return reference, _discovery.load_app(reference, cwd)


def _serve(ns: argparse.Namespace) -> int:
    env = _config.from_env(os.environ)
    flags = _settings_from_args(ns)
    _logging.configure(flags.get("log_level") or env.get("log_level") or "info")
    _, app = _load(ns)
    config = app.config.replace(**{**env, **flags})
    _logging.configure(config.log_level)
    return asyncio.run(app.serve(config, install_signal_handlers=True))


def _health(ns: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(ns.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=ns.service), timeout=ns.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                print(f"UNKNOWN: {ns.target} has no health service {ns.service!r}")
                return 1
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                print(f"UNREACHABLE: {ns.target}: {code.name}: {exc.details()}")
                return 2
            print(f"UNKNOWN: {ns.target}: {code.name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status if not ns.service else f"{status} ({ns.service})")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "serve":
            return _serve(ns)
        if ns.command == "health":
            return _health(ns)
        from ._routes_cli import run_routes

        return run_routes(ns, _load)
    except MeshrpcError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the server installed its handlers
        return 130
