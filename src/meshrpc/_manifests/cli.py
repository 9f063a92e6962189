"""The ``meshrpc routes`` command: options in, YAML out (stdout, a directory, or a check)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import _config
from .._app import App
from . import manifests, notes, render
from .options import DEFAULT_METRICS_PORT, RoutesError, RoutesOptions

DESCRIPTION = """\
Write the Kubernetes and Istio manifests for an app, from the services it registers and
its own settings: ServiceAccount (the app's mesh identity), Deployment (gRPC probes on
separate readiness and liveness names, a grace period that covers the drain, Prometheus
annotations), Service (port 'grpc', appProtocol grpc), HorizontalPodAutoscaler, Gateway,
VirtualService (one /package.Service/ prefix per service), DestinationRule,
AuthorizationPolicy (the gateway and --allow-from callers: L4 rules both data planes
enforce; paths with --data-plane sidecar or on the --waypoint's policy), PeerAuthentication
(--mtls) and PodDisruptionBudget; NetworkPolicy and PodMonitor on request; or, with --api
gateway-api, a Gateway API Gateway and GRPCRoute. Every route retries explicitly: only
what never reached the app, plus UNAVAILABLE for methods the proto declares idempotent.
Stated assumptions: Istio 1.22+, an istioctl-installed ingress (--ingress helm for Helm's
chart), Gateway API v1.1+. The output is deterministic; its header records the
options, so `--check FILE` alone makes it again. Invalid input is an error with nothing
on stdout."""


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
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="the autoscaler's minimum; with --no-autoscaling, the Deployment's (default 2)",
    )
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
        "--ingress",
        choices=["istioctl", "helm"],
        default="istioctl",
        help="how Istio's ingress gateway was installed: sets the Gateway's selector and the policy's "
        "gateway principal together (istioctl: istio=ingressgateway in istio-system; helm: istio=ingress "
        "in istio-ingress; default istioctl)",
    )
    p.add_argument(
        "--gateway-selector",
        action="append",
        metavar="KEY=VALUE",
        help="Istio Gateway pod selector (repeatable; default: the --ingress install's label)",
    )
    p.add_argument("--gateway-class", default="istio", help="gatewayClassName for --api gateway-api (default istio)")
    p.add_argument("--gateway-port", type=int, help="gateway port (default 80, or 443 with --tls-secret)")
    p.add_argument("--tls-secret", help="TLS credential (Secret) for the gateway: serves HTTPS")
    p.add_argument(
        "--mesh-routing", action="store_true", help="also route in-mesh calls (VirtualService 'mesh', GAMMA parentRef)"
    )
    p.add_argument("--headless", action="store_true", help="also write a headless Service for client-side balancing")
    p.add_argument("--resources", help="comma-separated kinds to write (default: all of the flavour)")
    security = p.add_argument_group("who may call (Istio security)")
    security.add_argument(
        "--allow-from",
        action="append",
        metavar="NAMESPACE[/SERVICEACCOUNT]",
        help="an in-mesh caller the AuthorizationPolicy allows (repeatable; default: the gateway only)",
    )
    security.add_argument(
        "--gateway-principal",
        metavar="PRINCIPAL",
        help="the gateway's identity (default: Istio's ingress gateway; NAME-gateway-CLASS with gateway-api)",
    )
    security.add_argument(
        "--trust-domain", default="cluster.local", help="the mesh's trust domain (default cluster.local)"
    )
    security.add_argument("--mtls", choices=["strict", "permissive"], help="write a PeerAuthentication in this mode")
    security.add_argument(
        "--data-plane",
        choices=["any", "sidecar", "ambient"],
        default="any",
        help="the pods' data plane: any (default) writes L4 rules only, which sidecars and ztunnel both "
        "enforce; sidecar adds per-service paths to the pods' policy",
    )
    security.add_argument(
        "--waypoint",
        metavar="NAME",
        help="ambient: the waypoint serving the app's Service; its policy (targetRefs) gets the path rules",
    )
    security.add_argument(
        "--network-policy", action="store_true", help="also write a Kubernetes NetworkPolicy (defence in depth)"
    )
    security.add_argument(
        "--no-authorization-policy",
        dest="authorization",
        action="store_false",
        help="do not write the AuthorizationPolicy",
    )
    scaling = p.add_argument_group("how it scales")
    scaling.add_argument("--max-replicas", type=int, default=10, help="the autoscaler's maximum (default 10)")
    scaling.add_argument(
        "--target-cpu", type=int, default=70, help="target CPU utilisation, %% of the request (default 70)"
    )
    scaling.add_argument("--cpu-request", default="100m", help="the container's CPU request (default 100m)")
    scaling.add_argument("--memory-request", default="128Mi", help="the container's memory request (default 128Mi)")
    scaling.add_argument("--memory-limit", default="512Mi", help="the container's memory limit (default 512Mi)")
    scaling.add_argument(
        "--no-autoscaling",
        dest="autoscaling",
        action="store_false",
        help="no HorizontalPodAutoscaler: fixed --replicas",
    )
    scraping = p.add_argument_group("how it is scraped, and what the app needs")
    scraping.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port: MESHRPC_METRICS_PORT and the pod annotations (default {DEFAULT_METRICS_PORT})",
    )
    scraping.add_argument("--no-metrics", dest="metrics", action="store_false", help="no /metrics port or annotations")
    scraping.add_argument(
        "--pod-monitor", action="store_true", help="also write a Prometheus Operator PodMonitor for /metrics"
    )
    scraping.add_argument(
        "--env", action="append", metavar="KEY=VALUE", help="an environment variable for the app (repeatable)"
    )
    scraping.add_argument(
        "--env-from",
        action="append",
        metavar="configmap:NAME|secret:NAME",
        help="variables from a ConfigMap or Secret (repeatable)",
    )
    settings = p.add_argument_group("app settings written into the manifest (default: the app's own)")
    for name in ("port", "drain_delay", "grace"):
        settings.add_argument("--" + name.replace("_", "-"), dest=name, metavar=name.upper())
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", type=Path, metavar="DIR", help="write one file per resource into DIR")
    out.add_argument(
        "--check",
        type=Path,
        metavar="FILE",
        help="exit 1 with a diff when FILE (or a directory made with --output) differs from the output; "
        "alone, with the options it records",
    )


def _selector(pairs: list[str] | None) -> tuple[tuple[str, str], ...] | None:
    if not pairs:
        return None
    result = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RoutesError(f"gateway selector {pair!r} is not KEY=VALUE")
        result.append((key, value))
    return tuple(result)


def _env(pairs: list[str] | None) -> tuple[tuple[str, str], ...]:
    result = []
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise RoutesError(f"--env {pair!r} is not KEY=VALUE")
        result.append((key, value))
    return tuple(result)


def _recordable(argv: Sequence[str]) -> list[str]:
    """The options that shape the YAML: all but where it goes (--output, --check)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--output", "-o", "--check"):
            skip = True
            continue
        if arg.startswith(("--output=", "--check=", "-o=")):
            continue
        kept.append(arg)
    return kept


def render_documents(
    ns: argparse.Namespace, app: App, app_ref: str, argv: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], str, list[str]]:
    changes = {n: _config.parse_value(n, getattr(ns, n)) for n in ("port", "drain_delay", "grace") if getattr(ns, n)}
    config = app.config.replace(**changes)
    options = RoutesOptions(
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
        ingress=ns.ingress,
        data_plane=ns.data_plane,
        waypoint=ns.waypoint,
        network_policy=ns.network_policy,
        pod_monitor=ns.pod_monitor,
        memory_request=ns.memory_request,
        memory_limit=ns.memory_limit,
        gateway_class=ns.gateway_class,
        gateway_port=ns.gateway_port,
        tls_secret=ns.tls_secret,
        mesh_routing=ns.mesh_routing,
        headless=ns.headless,
        resources=tuple(r.strip() for r in ns.resources.split(",")) if ns.resources else None,
        authorization=ns.authorization,
        gateway_principal=ns.gateway_principal,
        trust_domain=ns.trust_domain,
        allow_from=tuple(ns.allow_from or ()),
        mtls=ns.mtls,
        autoscaling=ns.autoscaling,
        max_replicas=ns.max_replicas,
        target_cpu=ns.target_cpu,
        cpu_request=ns.cpu_request,
        metrics_port=ns.metrics_port if ns.metrics else None,
        env=_env(ns.env),
        env_from=tuple(ns.env_from or ()),
    )
    documents = manifests(app.services, config, options)
    text = render.to_yaml(documents, render.header(app.name, app_ref, _recordable(argv)))
    return documents, text, notes(options, app.services)


def _read_check(path: Path) -> dict[str, str] | str:
    """What ``--check PATH`` compares against: a file's text, or a directory's YAML files by name."""
    if path.is_dir():
        files = {f.name: f.read_text() for f in sorted(path.glob("*.yaml"))}
        if not files:
            raise OSError(f"{path} holds no .yaml files")
        return files
    return path.read_text()


def _diff(current: str, wanted: str, name: str) -> bool:
    """Print a diff when ``current`` is not what meshrpc writes now; True when they differ."""
    if render.comparable(current) == render.comparable(wanted):
        return False
    sys.stdout.writelines(
        difflib.unified_diff(
            render.comparable(current).splitlines(keepends=True),
            render.comparable(wanted).splitlines(keepends=True),
            name,
            "meshrpc routes",
        )
    )
    return True


def _check(path: Path, current: dict[str, str] | str, documents: list[dict[str, Any]], text: str, head: str) -> int:
    if isinstance(current, dict):  # a directory made with --output: one file per resource
        wanted = {render.file_name(d): render.to_yaml([d], head) for d in documents}
        stale = [name for name in sorted(wanted) if name in current and _diff(current[name], wanted[name], name)]
        missing = sorted(set(wanted) - set(current))
        extra = sorted(set(current) - set(wanted))
        for what, names in (("differ", stale), ("are missing", missing), ("are no longer written", extra)):
            if names:
                print(f"{path}: {', '.join(names)} {what}", file=sys.stderr)
        if stale or missing or extra:
            print(f"{path} differs from what meshrpc routes writes now", file=sys.stderr)
            return 1
        print(f"{path} is up to date", file=sys.stderr)
        return 0
    held = [d for d in yaml.safe_load_all(current) if d]
    if len(held) == 1 and len(documents) > 1:
        # One file of an --output directory: compare the resource it holds.
        key = (held[0].get("kind"), (held[0].get("metadata") or {}).get("name"))
        match = [d for d in documents if (d["kind"], d["metadata"]["name"]) == key]
        if match:
            text = render.to_yaml(match, head)
    if _diff(current, text, str(path)):
        print(f"{path} differs from what meshrpc routes writes now", file=sys.stderr)
        return 1
    print(f"{path} is up to date", file=sys.stderr)
    return 0


def run_routes(
    ns: argparse.Namespace,
    load: Callable[[argparse.Namespace], tuple[str, App]],
    argv: Sequence[str] = (),
    reparse: Callable[[list[str]], argparse.Namespace] | None = None,
) -> int:
    """Run ``meshrpc routes``; ``argv`` are its own arguments, ``reparse`` parses a recorded set."""
    current: dict[str, str] | str | None = None
    if ns.check is not None:
        try:
            current = _read_check(ns.check)
        except OSError as exc:
            print(f"meshrpc routes: cannot read {ns.check}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not _recordable(argv) and reparse is not None:
            # `--check PATH` on its own: the options the file (or the directory's files) was made with.
            first = current if isinstance(current, str) else next(iter(current.values()))
            recorded = render.recorded_args(first)
            if recorded is None:
                print(
                    f"meshrpc routes: {ns.check} records no options (made by an older meshrpc): "
                    "give the app and options to check it against",
                    file=sys.stderr,
                )
                return 1
            argv = [*recorded, "--check", str(ns.check)]
            ns = reparse(argv)
    app_ref, app = load(ns)
    documents, text, found = render_documents(ns, app, app_ref, argv)
    for note in found:
        print(f"meshrpc routes: note: {note}", file=sys.stderr)
    head = render.header(app.name, app_ref, _recordable(argv))
    if current is not None:
        return _check(ns.check, current, documents, text, head)
    if ns.output is not None:
        ns.output.mkdir(parents=True, exist_ok=True)
        for document in documents:
            path = ns.output / render.file_name(document)
            path.write_text(render.to_yaml([document], head))
            print(path, file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0
