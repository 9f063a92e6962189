"""``meshrpc routes``: Kubernetes and Istio (or Gateway API) manifests from an App.

Pure functions: `manifests` takes the app's registered services, its config and
the options, and returns plain data (one dict per resource) in a fixed order; YAML is
written only at the edge (:mod:`.render`).  Same input, same bytes.

    options      what the command is told, validated once
    workload     ServiceAccount, Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget,
                 NetworkPolicy, PodMonitor
    istio        Gateway, VirtualService, DestinationRule, AuthorizationPolicy, PeerAuthentication
    gateway_api  Gateway API Gateway and GRPCRoute
    render       YAML, the header, file names
    cli          the command
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .._config import Config
from .._service import ServiceSpec
from . import gateway_api, istio, workload
from .options import RoutesError, RoutesOptions, grace_period

__all__ = ["RoutesError", "RoutesOptions", "grace_period", "manifests", "notes"]


def manifests(services: Sequence[ServiceSpec], config: Config, options: RoutesOptions) -> list[dict[str, Any]]:
    """Every resource for the app, in a fixed order."""
    if not services:
        raise RoutesError(f"app {options.name!r} registers no services: there is nothing to route")
    if not 1 <= config.port <= 65535:
        raise RoutesError(f"port must be 1..65535 in a manifest, got {config.port}")
    if options.metrics_port == config.port:
        raise RoutesError(f"the metrics port and the gRPC port are both {config.port}: give --metrics-port another")
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "ServiceAccount": lambda: workload.service_account(options),
        "Deployment": lambda: workload.deployment(options, config),
        "Service": lambda: workload.service(options, config),
        "HeadlessService": lambda: workload.service(options, config, headless=True),
        "HorizontalPodAutoscaler": lambda: workload.horizontal_pod_autoscaler(options, config),
        "Gateway": lambda: istio.gateway(options) if options.flavour == "istio" else gateway_api.gateway(options),
        "VirtualService": lambda: istio.virtual_service(options, config, services),
        "MeshVirtualService": lambda: istio.mesh_virtual_service(options, config, services),
        "DestinationRule": lambda: istio.destination_rule(options),
        "GRPCRoute": lambda: gateway_api.grpc_route(options, config, services),
        "AuthorizationPolicy": lambda: istio.authorization_policy(options, config, services),
        "WaypointPolicy": lambda: istio.waypoint_policy(options, services),
        "NetworkPolicy": lambda: workload.network_policy(options, config),
        "PodMonitor": lambda: workload.pod_monitor(options),
        "PeerAuthentication": lambda: istio.peer_authentication(options),
        "PodDisruptionBudget": lambda: workload.pod_disruption_budget(options),
    }
    return [builders[kind]() for kind in options.kinds]


def notes(options: RoutesOptions, services: Sequence[ServiceSpec]) -> list[str]:
    """Things the user should know about the output (printed to stderr, never into the YAML)."""
    found = []
    kinds = options.kinds
    if options.image is None and "Deployment" in kinds:
        found.append(f"no --image given: the Deployment uses the placeholder {options.image_or_placeholder}")
    if options.flavour == "gateway-api":
        has_policy = any(s.route for s in services) or any(m.route for s in services for m in s.methods)
        if has_policy:
            found.append(
                "timeouts and retries from @meshrpc.route are not part of GRPCRoute (Gateway API v1 standard); "
                "they are written only by the istio flavour"
            )
    if options.flavour == "istio" and "Gateway" in kinds:
        selector = ",".join(f"{k}={v}" for k, v in options.gateway_selector_or_default.items())
        install = {"istioctl": "istioctl's default profile", "helm": "Helm's istio/gateway chart as istio-ingress"}
        found.append(
            f"the Gateway selects pods labelled {selector} (Istio's ingress gateway as "
            f"{install[options.ingress]} installs it); for another install: --ingress "
            f"{'helm' if options.ingress == 'istioctl' else 'istioctl'}, or --gateway-selector and --gateway-principal"
        )
    if "Gateway" in kinds and not options.tls_secret and any(h != "*" for h in options.hosts):
        found.append(
            f"the Gateway serves {', '.join(h for h in options.hosts if h != '*')} in plaintext: "
            "give --tls-secret for a host that clients reach over the internet"
        )
    if options.flavour == "gateway-api" and "GRPCRoute" in kinds:
        found.append(
            "GRPCRoute (Gateway API v1) has no retry policy, so Istio's default retries apply to every method, "
            "'unavailable' included; for retries read from the proto's idempotency_level use --api istio"
        )
    if not options.istio_security:
        found.append(
            f"gateway class {options.gateway_class!r} is not Istio: no AuthorizationPolicy or PeerAuthentication "
            "is written, so who may call the app and mTLS between pods are NOT enforced; use your mesh's or "
            "your CNI's policy (a NetworkPolicy at least)"
        )
    elif "AuthorizationPolicy" in kinds:
        if not options.allow_from:
            found.append(
                f"the AuthorizationPolicy lets only the gateway ({options.gateway_principal_or_default}) call "
                f"{options.name}; name in-mesh callers with --allow-from NAMESPACE[/SERVICEACCOUNT]"
            )
        if options.data_plane == "any" and options.waypoint is None:
            found.append(
                "the AuthorizationPolicy on the pods matches callers and ports only (L4), which a sidecar and "
                "ambient's ztunnel both enforce; per-service paths need --data-plane sidecar, or --waypoint NAME"
            )
    return found
