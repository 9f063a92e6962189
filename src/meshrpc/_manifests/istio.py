"""Istio: Gateway, VirtualService, DestinationRule; AuthorizationPolicy and PeerAuthentication."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

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
        "metadata": {
            **metadata(options, options.gateway_ref),
            "namespace": options.gateway_namespace or options.namespace,
        },
        "spec": {"selector": dict(options.gateway_selector), "servers": [server]},
    }


def _route_policy(route: RouteOptions | None) -> dict[str, Any]:
    if route is None:
        return {}
    policy: dict[str, Any] = {}
    if route.timeout is not None:
        policy["timeout"] = seconds(route.timeout)
    if route.retries is not None:
        retries: dict[str, Any] = {"attempts": route.retries}
        if route.per_try_timeout is not None:
            retries["perTryTimeout"] = seconds(route.per_try_timeout)
        if route.retry_on:
            retries["retryOn"] = ",".join(route.retry_on)
        policy["retries"] = retries
    elif route.per_try_timeout is not None:
        policy["retries"] = {"attempts": 1, "perTryTimeout": seconds(route.per_try_timeout)}
    return policy


def route_name(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def http_routes(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> list[dict[str, Any]]:
    destination = {"host": fqdn(options), "port": {"number": config.port}}
    http: list[dict[str, Any]] = []
    # Exact method routes first: Istio takes the first match.
    for svc in services:
        for method in svc.methods:
            if method.route is not None:
                http.append(
                    {
                        "name": route_name(svc.name, method.name),
                        "match": [{"uri": {"exact": method.path}}],
                        "route": [{"destination": destination}],
                        **_route_policy(method.route),
                    }
                )
    for svc in services:
        http.append(
            {
                "name": route_name(svc.name),
                # The trailing slash keeps /pkg.Service from also matching /pkg.ServiceV2/...
                "match": [{"uri": {"prefix": svc.prefix}}],
                "route": [{"destination": destination}],
                **_route_policy(svc.route),
            }
        )
    return http


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
    http = [*http_routes(options, config, services), {"name": "default", "route": [{"destination": destination}]}]
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
                "outlierDetection": {
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


def authorization_policy(options: RoutesOptions, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    """ALLOW on the app's pods: the gateway and the named callers, to the registered services only.

    With an ALLOW policy on a workload, a request no rule matches is denied.  Health and
    reflection are in no rule: kubelet's probes never pass the inbound policy, because the
    sidecar injector rewrites them to the agent (:15020), which calls the app over localhost.
    """
    to = [{"operation": {"paths": service_paths(services)}}]
    rules: list[dict[str, Any]] = [
        {"from": [{"source": {"principals": [options.gateway_principal_or_default]}}], "to": to}
    ]
    principals, namespaces = options.caller_principals()
    if principals:
        rules.append({"from": [{"source": {"principals": principals}}], "to": to})
    if namespaces:
        rules.append({"from": [{"source": {"namespaces": namespaces}}], "to": to})
    if options.metrics_port is not None:
        # Prometheus scraping the pod directly (without Istio's metrics merging): GET /metrics only.
        rules.append(
            {"to": [{"operation": {"ports": [str(options.metrics_port)], "methods": ["GET"], "paths": ["/metrics"]}}]}
        )
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata(options),
        "spec": {"selector": {"matchLabels": selector(options)}, "action": "ALLOW", "rules": rules},
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
