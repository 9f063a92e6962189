"""The ``meshrpc`` command: serve, health, list, describe, call, routes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _config, _discovery, _logging, _runner
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
        prog=PROG, description="Serve gRPC apps on Kubernetes and Istio, and write their manifests.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve an app: health, reflection and a graceful drain on SIGTERM",
        description="Serve a meshrpc.App until SIGTERM or SIGINT, then drain without losing requests. "
        "Settings: the app's code, then MESHRPC_* variables, then these flags (the last one wins).",
        allow_abbrev=False,
    )
    _add_app_argument(serve)
    dev = serve.add_argument_group("running")
    dev.add_argument(
        "--reload",
        action="store_true",
        help="development: restart when a .py file under the current directory changes, with no drain delay "
        "(needs watchfiles: pip install watchfiles)",
    )
    logs = dev.add_mutually_exclusive_group()
    logs.add_argument(
        "--log-config",
        metavar="FILE",
        help="configure logging from FILE (.json or .yaml: logging dictConfig; else an ini fileConfig)",
    )
    logs.add_argument(
        "--no-log-config",
        action="store_true",
        help="leave logging entirely to the app (by default meshrpc logs to stderr unless the app set up logging)",
    )
    _add_setting_flags(serve)

    health = commands.add_parser(
        "health",
        help="check a server's gRPC health: exit 0 SERVING, 1 not serving or unknown, 2 unreachable",
        description="Ask TARGET's grpc.health.v1 service once and print one line. Exit status: 0 when "
        "SERVING, 1 when NOT_SERVING or the service is unknown, 2 when the server cannot be reached.",
        allow_abbrev=False,
    )
    health.add_argument("target", metavar="TARGET", help="host:port of the server, e.g. 127.0.0.1:50051")
    health.add_argument("--service", default="", help="health name to check ('' = the server's readiness)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")

    _add_client_commands(commands)

    from ._manifests.cli import add_routes_command

    add_routes_command(commands)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="host:port of a server with reflection, e.g. 127.0.0.1:50051")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (default: plaintext, as to a dev server)")
    parser.add_argument("--cacert", metavar="FILE", help="PEM root certificates for TLS (implies --tls)")
    parser.add_argument("--authority", help="the :authority (Host) to send, e.g. the gateway's host name")
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, metavar="SECONDS", help="seconds to connect (default 10)"
    )


def _add_client_commands(commands: Any) -> None:
    """The built-in client: the API is learnt from the server's reflection, JSON in and out."""
    listing = commands.add_parser(
        "list",
        help="list a server's services, or one service's methods (through its reflection)",
        description="List the services TARGET serves, or the methods of SERVICE, read from its server reflection.",
        allow_abbrev=False,
    )
    _add_connection_flags(listing)
    listing.add_argument("service", nargs="?", metavar="SERVICE", help="a service's full name, e.g. helloworld.Greeter")
    describing = commands.add_parser(
        "describe",
        help="describe a service, method or message (its request and reply fields)",
        description="Print SYMBOL (a service, a method as package.Service/Method, a message or an enum) as .proto text.",
        allow_abbrev=False,
    )
    _add_connection_flags(describing)
    describing.add_argument("symbol", metavar="SYMBOL", help="e.g. helloworld.Greeter/SayHello")
    calling = commands.add_parser(
        "call",
        help="call a method with a JSON request and print the replies as JSON",
        description="Call METHOD on TARGET. The request is JSON (-d), in protobuf's JSON mapping; each reply is "
        "printed as JSON. A failed call prints its status and its google.rpc.Status details and exits 1. "
        "Exit 2: cannot connect, or bad input.",
        allow_abbrev=False,
    )
    _add_connection_flags(calling)
    calling.add_argument("method", metavar="METHOD", help="package.Service/Method, e.g. helloworld.Greeter/SayHello")
    calling.add_argument(
        "-d",
        "--data",
        default="{}",
        help="the request as JSON (a JSON array of them for a client stream; '@-' reads it from stdin)",
    )
    calling.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request metadata (repeatable)",
    )
    calling.add_argument("--timeout", type=float, metavar="SECONDS", help="the call's deadline in seconds")


def _load(ns: argparse.Namespace) -> tuple[str, App]:
    """The app's ``module:attr`` reference (argument, MESHRPC_APP or pyproject.toml) and the App."""
    cwd = Path.cwd()
    reference = _discovery.app_reference(ns.app, os.environ, cwd)
    return reference, _discovery.load_app(reference, cwd)


def _serve(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    env = _config.from_env(os.environ)
    flags = _settings_from_args(ns)
    _config.Config().replace(**{**env, **flags})  # every given value is valid before anything starts
    if ns.reload:
        from ._reload import serve_with_reload

        return serve_with_reload(argv, Path.cwd())
    _, app = _load(ns)
    config = app.config.replace(**{**env, **flags})
    if ns.log_config:
        _logging.configure_from_file(ns.log_config)
    elif not ns.no_log_config:
        _logging.configure(config.log_level)
    return _runner.run(app.serve(config, install_signal_handlers=True))


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


def _client(ns: argparse.Namespace) -> int:
    import grpc

    from . import _reflection_client as client

    try:
        with client.Reflected(
            ns.target, tls=ns.tls, cacert=ns.cacert, authority=ns.authority, timeout=ns.connect_timeout
        ) as reflected:
            if ns.command == "list":
                if ns.service is None:
                    print("\n".join(reflected.services()))
                else:
                    service = reflected.service(ns.service)
                    print("\n".join(f"{service.full_name}/{m.name}" for m in service.methods))
                return 0
            if ns.command == "describe":
                print(client.describe(reflected.symbol(ns.symbol)))
                return 0
            data = sys.stdin.read() if ns.data == "@-" else ns.data
            metadata = []
            for header in ns.header:
                name, sep, value = header.partition(":")
                if not sep or not name.strip():
                    raise client.ClientError(f"-H {header!r} is not 'NAME: VALUE'")
                metadata.append((name.strip().lower(), value.strip()))
            try:
                client.call(reflected, ns.method, data, metadata=metadata, timeout=ns.timeout)
            except grpc.RpcError as exc:
                print(client.error_report(exc, reflected.pool), file=sys.stderr)
                return 1
            return 0
    except client.ClientError as exc:
        print(f"{PROG} {ns.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # reflection itself failed (a server without it)
        code: Any = exc
        print(
            f"{PROG} {ns.command}: {ns.target}: server reflection failed: {code.code().name}: {code.details()}",
            file=sys.stderr,
        )
        return 2


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top-level one, says what it takes
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns = _parse(args)
    for warning in _config.unknown_variables(os.environ):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    try:
        if ns.command == "serve":
            return _serve(ns, args)
        if ns.command == "health":
            return _health(ns)
        if ns.command in ("list", "describe", "call"):
            return _client(ns)
        from ._manifests.cli import run_routes

        routes_argv = args[args.index("routes") + 1 :]
        return run_routes(ns, _load, routes_argv, lambda recorded: _parse(["routes", *recorded]))
    except MeshrpcError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the server installed its handlers
        return 130
