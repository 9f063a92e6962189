"""The Gateway API: a Gateway and a GRPCRoute (GAMMA for in-mesh calls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._config import Config
from .._service import ServiceSpec
from .istio import shared_metadata
from .options import RoutesOptions
from .workload import metadata


def gateway(options: RoutesOptions) -> dict[str, Any]:
    listener: dict[str, Any]
    if options.tls_secret:
        listener = {
            "name": "https-grpc",
            "port": options.gateway_port or 443,
            "protocol": "HTTPS",
            "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": options.tls_secret}]},
        }
    else:
        listener = {"name": "grpc", "port": options.gateway_port or 80, "protocol": "HTTP"}
    hosts = [h for h in options.hosts if h != "*"]
    if len(hosts) == 1:
        listener["hostname"] = hosts[0]
    same = options.gateway_namespace in (None, options.namespace)
    listener["allowedRoutes"] = {"kinds": [{"kind": "GRPCRoute"}], "namespaces": {"from": "Same" if same else "All"}}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        # Shared by every app on the defaults: one Gateway resource, so one gateway
        # deployment and one load balancer, not one per app.
        "metadata": shared_metadata(options),
        "spec": {"gatewayClassName": options.gateway_class, "listeners": [listener]},
    }


def grpc_route(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    backend = [{"name": options.name, "port": config.port}]
    rules: list[dict[str, Any]] = []
    for svc in services:
        for method in svc.methods:
            if method.route is not None:
                rules.append(
                    {
                        "matches": [{"method": {"type": "Exact", "service": svc.name, "method": method.name}}],
                        "backendRefs": backend,
                    }
                )
    # No rules[].name: the field is in GRPCRoute's standard channel only from Gateway API
    # v1.4, and the v1.1-v1.3 CRDs (Istio 1.22-1.24's own tasks install v1.1) reject it.
    for svc in services:
        rules.append({"matches": [{"method": {"type": "Exact", "service": svc.name}}], "backendRefs": backend})
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": options.gateway_ref}
    if options.gateway_namespace:
        parent["namespace"] = options.gateway_namespace
    parents = [parent]
    if options.mesh_routing:
        # GAMMA: the Service as parent applies the route to in-mesh calls to it.
        parents.append({"group": "", "kind": "Service", "name": options.name, "port": config.port})
    spec: dict[str, Any] = {"parentRefs": parents}
    hostnames = [h for h in options.hosts if h != "*"]
    if hostnames:
        spec["hostnames"] = hostnames
    spec["rules"] = rules
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": metadata(options),
        "spec": spec,
    }
