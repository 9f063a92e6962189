"""Istio: Gateway, VirtualService, DestinationRule; AuthorizationPolicy and PeerAuthentication."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2

from .._config import Config
from .._route_options import RouteOptions
from .._service import ServiceSpec
from .options import RoutesOptions, seconds
from .workload import fqdn, metadata, selector


def gateway(options: RoutesOptions) -> dict[str, Any]:
    server: dict[str, Any]
    if options.tls_secret:
        server = {
            "port": {"number": options.gateway_port or 443, "name": "https-grpc", "protocol": "HTTPS"},
            "hosts": list(options.hosts),
            "tls": {"mode": "SIMPLE", "credentialName": options.tls_secret},
        }
    else:
        server = {
            "port": {"number": options.gateway_port or 80, "name": "grpc", "protocol": "GRPC"},
            "hosts": list(options.hosts),
        }
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": shared_metadata(options),
        "spec": {"selector": options.gateway_selector_or_default, "servers": [server]},
    }


def shared_metadata(options: RoutesOptions) -> dict[str, Any]:
    """A Gateway's metadata: nothing of one app's in it, so every app that shares the
    Gateway writes the same resource and `kubectl apply` of either changes nothing."""
    return {
        "name": options.gateway_ref,
        "namespace": options.gateway_namespace or options.namespace,
        "labels": {"app.kubernetes.io/managed-by": "meshrpc"},
    }


# Retries Istio may make on its own when a route says nothing: two attempts on
# "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes" (Istio's
# traffic-management docs).  "unavailable" and "cancelled" come back after the request
# reached the app, so a non-idempotent call would run twice.  Every route therefore says
# what it retries: what never reached the app, for every method; more only where the
# proto declares the method safe to repeat (idempotency_level), or the code asks.
SAFE_RETRY_ON = ("connect-failure", "refused-stream", "reset-before-request")
IDEMPOTENT_RETRY_ON = (*SAFE_RETRY_ON, "unavailable", "cancelled")
RETRY_ATTEMPTS = 2


def idempotent(service: ServiceSpec, method: str) -> bool:
    """Whether the proto declares ``method`` safe to repeat:
    ``option idempotency_level = IDEMPOTENT`` (or ``NO_SIDE_EFFECTS``)."""
    level = service.descriptor.methods_by_name[method].GetOptions().idempotency_level
    return level in (descriptor_pb2.MethodOptions.IDEMPOTENT, descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS)


def default_retries(repeatable: bool) -> dict[str, Any]:
    return {"attempts": RETRY_ATTEMPTS, "retryOn": ",".join(IDEMPOTENT_RETRY_ON if repeatable else SAFE_RETRY_ON)}


def _route_policy(route: RouteOptions | None, repeatable: bool) -> dict[str, Any]:
    """A route's timeout and its explicit retries: the code's, else what is safe for the method."""
    policy: dict[str, Any] = {}
    if route is not None and route.timeout is not None:
        policy["timeout"] = seconds(route.timeout)
    if route is not None and route.retries is not None:
        retries: dict[str, Any] = {"attempts": route.retries}
        if route.retries:  # the code's conditions, else the ones safe for this method
            retries["retryOn"] = ",".join(route.retry_on) or default_retries(repeatable)["retryOn"]
    else:
        retries = default_retries(repeatable)
    if route is not None and route.per_try_timeout is not None and retries["attempts"]:
        retries["perTryTimeout"] = seconds(route.per_try_timeout)
    policy["retries"] = retries
    return policy


def route_name(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def http_routes(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> list[dict[str, Any]]:
    destination = {"host": fqdn(options), "port": {"number": config.port}}
    http: list[dict[str, Any]] = []
    prefix_routes: list[dict[str, Any]] = []
    for svc in services:
        repeatable = {m.name: idempotent(svc, m.name) for m in svc.methods}
        # The prefix route retries "unavailable" only when every method may be repeated.
        all_repeatable = all(repeatable.values())
        # Exact method routes first (Istio takes the first match): where the code set a
        # policy, and where a method's retries differ from its service's prefix route.
        for method in svc.methods:
            differs = svc.route is None or svc.route.retries is None
            if method.route is not None or (differs and repeatable[method.name] != all_repeatable):
                http.append(
                    {
                        "name": route_name(svc.name, method.name),
                        "match": [{"uri": {"exact": method.path}}],
                        "route": [{"destination": destination}],
                        **_route_policy(method.route or svc.route, repeatable[method.name]),
                    }
                )
        prefix_routes.append(
            {
                "name": route_name(svc.name),
                # The trailing slash keeps /pkg.Service from also matching /pkg.ServiceV2/...
                "match": [{"uri": {"prefix": svc.prefix}}],
                "route": [{"destination": destination}],
                **_route_policy(svc.route, all_repeatable),
            }
        )
    return http + prefix_routes


def virtual_service(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    """The gateway's routes: the registered services and nothing else (no health, no reflection)."""
    # Bound to the gateway whether meshrpc writes it or the platform team owns it.
    gateway_ns = options.gateway_namespace
    gateway = f"{gateway_ns}/{options.gateway_ref}" if gateway_ns else options.gateway_ref
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": metadata(options),
        "spec": {"hosts": list(options.hosts), "gateways": [gateway], "http": http_routes(options, config, services)},
    }


def mesh_virtual_service(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    """In-mesh routes (``--mesh-routing``): the same policies for calls from other pods.

    A VirtualService of its own, because Istio rejects the host '*' on one bound to
    the mesh gateway; it ends with a catch-all, so in-mesh clients can still reach
    health and reflection on the Service (the sidecar answers 404 to unrouted paths).
    """
    destination = {"host": fqdn(options), "port": {"number": config.port}}
    catch_all = {"name": "default", "route": [{"destination": destination}], "retries": default_retries(False)}
    http = [*http_routes(options, config, services), catch_all]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": metadata(options, f"{options.name}-mesh"),
        "spec": {"hosts": [fqdn(options)], "gateways": ["mesh"], "http": http},
    }


def destination_rule(options: RoutesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": metadata(options),
        "spec": {
            "host": fqdn(options),
            "trafficPolicy": {
                # Per-request balancing over HTTP/2: the least busy replica, not the next one.
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"http": {"http2MaxRequests": 1000, "maxRequestsPerConnection": 0}},
                # Eject a replica that cannot be reached (UNAVAILABLE, connect failures: gateway
                # errors), never one whose handlers answer INTERNAL or UNKNOWN: the same code
                # fails on every replica.  Istio: consecutive5xxErrors defaults to 5 and
                # "if the value of consecutive_gateway_errors is greater than or equal to the
                # value of consecutive_5xx_errors, consecutive_gateway_errors will have no
                # effect"; 0 disables it, so only gateway errors count.
                "outlierDetection": {
                    "consecutive5xxErrors": 0,
                    "consecutiveGatewayErrors": 5,
                    "interval": "10s",
                    "baseEjectionTime": "30s",
                    "maxEjectionPercent": 50,
                },
            },
        },
    }


def service_paths(services: Sequence[ServiceSpec]) -> list[str]:
    """The app's own services as AuthorizationPolicy paths: ``/pkg.Service/*`` (prefix match)."""
    return [f"{svc.prefix}*" for svc in services]


def _caller_rules(options: RoutesOptions, to: list[dict[str, Any]], extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"from": [{"source": {"principals": [options.gateway_principal_or_default, *extra]}}], "to": to}
    ]
    principals, namespaces = options.caller_principals()
    if principals:
        rules.append({"from": [{"source": {"principals": principals}}], "to": to})
    if namespaces:
        rules.append({"from": [{"source": {"namespaces": namespaces}}], "to": to})
    return rules


def authorization_policy(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    """ALLOW on the app's pods: the gateway and the named callers, to the gRPC port.

    With an ALLOW policy on a workload, a request no rule matches is denied.  A policy that
    selects the pods is enforced by their sidecar, or in ambient by the receiving ztunnel,
    which only knows L4: principals, namespaces and ports.  ztunnel turns a rule with L7
    fields (paths, methods) into DENY, so such fields are written here only for
    ``--data-plane sidecar``; elsewhere path rules live on the waypoint's policy
    (`waypoint_policy`).  Kubelet's probes never pass this policy: the sidecar
    injector rewrites them to the agent (:15020), and ztunnel lets the node's probes in.
    """
    to: list[dict[str, Any]] = [{"operation": {"ports": [str(config.port)]}}]
    if options.l7_on_pods:
        to = [{"operation": {"ports": [str(config.port)], "paths": service_paths(services)}}]
    # Behind a waypoint, the receiving ztunnel sees the waypoint as the caller.
    waypoint = [options.waypoint_principal] if options.waypoint_principal else []
    rules = _caller_rules(options, to, waypoint)
    if options.metrics_port is not None:
        # Prometheus scraping the pod directly (without Istio's metrics merging): the metrics port.
        metrics: dict[str, Any] = {"ports": [str(options.metrics_port)]}
        if options.l7_on_pods:
            metrics.update({"methods": ["GET"], "paths": ["/metrics"]})
        rules.append({"to": [{"operation": metrics}]})
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata(options),
        "spec": {"selector": {"matchLabels": selector(options)}, "action": "ALLOW", "rules": rules},
    }


def waypoint_policy(options: RoutesOptions, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    """ALLOW at the ambient waypoint (``--waypoint``), attached to the app's Service: the
    gateway and the named callers, to the registered services' paths only (no health or
    reflection), enforced where L7 is seen.  Istio: policies for a waypoint use
    ``targetRefs`` (Istio 1.22+), not a pod selector."""
    to = [{"operation": {"paths": service_paths(services)}}]
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata(options, f"{options.name}-waypoint"),
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": options.name}],
            "action": "ALLOW",
            "rules": _caller_rules(options, to),
        },
    }


def peer_authentication(options: RoutesOptions) -> dict[str, Any]:
    """mTLS for the app's pods (``--mtls``); the metrics port stays reachable for a plain scraper."""
    mode = (options.mtls or "strict").upper()
    spec: dict[str, Any] = {"selector": {"matchLabels": selector(options)}, "mtls": {"mode": mode}}
    if options.metrics_port is not None and mode == "STRICT":
        spec["portLevelMtls"] = {str(options.metrics_port): {"mode": "PERMISSIVE"}}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": metadata(options),
        "spec": spec,
    }
