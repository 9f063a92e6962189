"""The ``meshrpc routes`` command: options in, YAML out (stdout, a directory, or a check)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _config, _routes
from ._app import App

DESCRIPTION = """\
Write the Kubernetes and Istio manifests for an app, from the services it registers and
its own settings: Deployment (gRPC probes on separate readiness and liveness names, a
grace period that covers the drain), Service (port 'grpc', appProtocol grpc), Gateway,
VirtualService (one /package.Service/ prefix per service), DestinationRule and
PodDisruptionBudget; or, with --api gateway-api, a Gateway API Gateway and GRPCRoute.
The output is deterministic. Invalid input is an error with nothing on stdout."""


def add_routes_command(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "routes",
        help="write Kubernetes and Istio manifests for an app",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "app",
        nargs="?",
        metavar="MODULE:ATTR",
        help="the meshrpc.App; default: $MESHRPC_APP, then [tool.meshrpc] app in ./pyproject.toml",
    )
    p.add_argument("--api", choices=["istio", "gateway-api"], default="istio", help="flavour (default istio)")
    p.add_argument("--name", help="resource name (default: the app's name)")
    p.add_argument("--namespace", default="default", help="namespace (default 'default')")
    p.add_argument("--image", help="container image (default: a placeholder, with a warning)")
    p.add_argument("--replicas", type=int, default=2, help="Deployment replicas (default 2)")
    p.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="host the gateway serves (repeatable; default '*')",
    )
    p.add_argument("--no-gateway", dest="gateway", action="store_false", help="do not write a Gateway (reference one)")
    p.add_argument("--gateway-name", help="Gateway name (default NAME-gateway)")
    p.add_argument("--gateway-namespace", help="namespace of the Gateway (default: the app's)")
    p.add_argument(
        "--gateway-selector",
        action="append",
        metavar="KEY=VALUE",
        help="Istio Gateway pod selector (repeatable; default istio=ingressgateway)",
    )
    p.add_argument("--gateway-class", default="istio", help="gatewayClassName for --api gateway-api (default istio)")
    p.add_argument("--gateway-port", type=int, help="gateway port (default 80, or 443 with --tls-secret)")
    p.add_argument("--tls-secret", help="TLS credential (Secret) for the gateway: serves HTTPS")
    p.add_argument(
        "--mesh-routing", action="store_true", help="also route in-mesh calls (VirtualService 'mesh', GAMMA parentRef)"
    )
    p.add_argument("--headless", action="store_true", help="also write a headless Service for client-side balancing")
    p.add_argument("--resources", help="comma-separated kinds to write (default: all of the flavour)")
    settings = p.add_argument_group("app settings written into the manifest (default: the app's own)")
    for name in ("port", "drain_delay", "grace"):
        settings.add_argument("--" + name.replace("_", "-"), dest=name, metavar=name.upper())
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", type=Path, metavar="DIR", help="write one file per resource into DIR")
    out.add_argument("--check", type=Path, metavar="FILE", help="exit 1 with a diff when FILE differs from the output")


def _selector(pairs: list[str] | None) -> tuple[tuple[str, str], ...]:
    if not pairs:
        return (("istio", "ingressgateway"),)
    result = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise _routes.RoutesError(f"gateway selector {pair!r} is not KEY=VALUE")
        result.append((key, value))
    return tuple(result)


def render(ns: argparse.Namespace, app: App, app_ref: str) -> tuple[list[dict[str, Any]], str, list[str]]:
    changes = {n: _config.parse_value(n, getattr(ns, n)) for n in ("port", "drain_delay", "grace") if getattr(ns, n)}
    config = app.config.replace(**changes)
    options = _routes.RoutesOptions(
        name=ns.name or app.name,
        app_ref=app_ref,
        namespace=ns.namespace,
        image=ns.image,
        replicas=ns.replicas,
        hosts=tuple(ns.hosts or ("*",)),
        flavour=ns.api,
        gateway=ns.gateway,
        gateway_name=ns.gateway_name,
        gateway_namespace=ns.gateway_namespace,
        gateway_selector=_selector(ns.gateway_selector),
        gateway_class=ns.gateway_class,
        gateway_port=ns.gateway_port,
        tls_secret=ns.tls_secret,
        mesh_routing=ns.mesh_routing,
        headless=ns.headless,
        resources=tuple(r.strip() for r in ns.resources.split(",")) if ns.resources else None,
    )
    documents = _routes.manifests(app.services, config, options)
    text = _routes.to_yaml(documents, _routes.header(app.name, app_ref))
    return documents, text, _routes.notes(options, app.services)


def run_routes(ns: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[str, App]]) -> int:
    app_ref, app = load(ns)
    documents, text, notes = render(ns, app, app_ref)
    for note in notes:
        print(f"meshrpc routes: note: {note}", file=sys.stderr)
    if ns.check is not None:
        try:
            current = ns.check.read_text()
        except OSError as exc:
            print(f"meshrpc routes: cannot read {ns.check}: {exc.strerror}", file=sys.stderr)
            return 1
        if current == text:
            print(f"{ns.check} is up to date", file=sys.stderr)
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), str(ns.check), "meshrpc routes"
            )
        )
        print(f"{ns.check} differs from what meshrpc routes writes now", file=sys.stderr)
        return 1
    if ns.output is not None:
        ns.output.mkdir(parents=True, exist_ok=True)
        head = _routes.header(app.name, app_ref)
        for document in documents:
            path = ns.output / _routes.file_name(document)
            path.write_text(_routes.to_yaml([document], head))
            print(path, file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0
