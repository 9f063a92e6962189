"""``meshrpc routes``: Kubernetes and Istio (or Gateway API) manifests from an App.

Pure functions: :func:`manifests` takes the app's registered services, its config and
the options, and returns plain data (one dict per resource) in a fixed order; YAML
is written only at the edge (:func:`to_yaml`).  Same input, same bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import yaml

from ._config import Config, env_name
from ._errors import MeshrpcError
from ._routing import RouteOptions
from ._service import ServiceSpec
from ._version import __version__

Flavour = Literal["istio", "gateway-api"]
ISTIO_KINDS = ("Deployment", "Service", "Gateway", "VirtualService", "DestinationRule", "PodDisruptionBudget")
# Kinds written only when asked for (--mesh-routing, --headless); "which resources" accepts them too.
GATEWAY_API_KINDS = ("Deployment", "Service", "Gateway", "GRPCRoute", "PodDisruptionBudget")
OPTIONAL_KINDS = ("MeshVirtualService", "HeadlessService")
EXIT_MARGIN = 1  # seconds for the process to exit after the lifespan's shutdown
PODINFO_DIR = "/etc/podinfo"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class RoutesError(MeshrpcError):
    """The routes cannot be generated from this input; the message says which value is wrong."""


@dataclasses.dataclass(frozen=True)
class RoutesOptions:
    """What ``meshrpc routes`` is told beyond the app itself.  Validated on creation."""

    name: str
    app_ref: str
    namespace: str = "default"
    image: str | None = None
    replicas: int = 2
    hosts: tuple[str, ...] = ("*",)
    flavour: Flavour = "istio"
    gateway: bool = True
    gateway_name: str | None = None
    gateway_namespace: str | None = None
    gateway_selector: tuple[tuple[str, str], ...] = (("istio", "ingressgateway"),)
    gateway_class: str = "istio"
    gateway_port: int | None = None
    tls_secret: str | None = None
    mesh_routing: bool = False
    headless: bool = False
    resources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name):
            raise RoutesError(
                f"name {self.name!r} is not a valid Kubernetes name "
                "(lowercase letters, digits and '-', starting with a letter, at most 63 characters)"
            )
        if not _DNS_1123_LABEL.match(self.namespace):
            raise RoutesError(f"namespace {self.namespace!r} is not a valid Kubernetes namespace name")
        if self.replicas < 1:
            raise RoutesError(f"replicas must be at least 1, got {self.replicas}")
        if self.image is not None and (not self.image or any(c.isspace() for c in self.image)):
            raise RoutesError(f"image {self.image!r} is not a container image reference")
        if self.flavour not in ("istio", "gateway-api"):
            raise RoutesError(f"flavour must be istio or gateway-api, got {self.flavour!r}")
        if not self.hosts:
            raise RoutesError("at least one host is needed (use '*' for any)")
        for host in self.hosts:
            if host != "*" and not _HOST.match(host):
                raise RoutesError(f"host {host!r} is not a DNS name (or '*', or '*.example.com')")
        if self.gateway_port is not None and not 1 <= self.gateway_port <= 65535:
            raise RoutesError(f"gateway port must be 1..65535, got {self.gateway_port}")
        for label_name in (self.gateway_name, self.gateway_namespace):
            if label_name is not None and not _DNS_1123_LABEL.match(label_name):
                raise RoutesError(f"{label_name!r} is not a valid Kubernetes name")
        if self.tls_secret is not None and not _DNS_1123_LABEL.match(self.tls_secret.replace(".", "-")):
            raise RoutesError(f"TLS secret {self.tls_secret!r} is not a valid Kubernetes name")
        for key, value in self.gateway_selector:
            if not key or not _LABEL_VALUE.match(value):
                raise RoutesError(f"gateway selector {key}={value} is not a valid label")
        if self.resources is not None:
            known = set(self.kinds_available)
            unknown = [r for r in self.resources if r not in known]
            if unknown:
                raise RoutesError(
                    f"unknown resource(s) {', '.join(unknown)} for flavour {self.flavour}; "
                    f"choose from {', '.join(self.kinds_available)}"
                )

    @property
    def kinds_available(self) -> tuple[str, ...]:
        return (ISTIO_KINDS if self.flavour == "istio" else GATEWAY_API_KINDS) + OPTIONAL_KINDS

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.resources is not None:
            return tuple(k for k in self.kinds_available if k in self.resources)
        kinds: tuple[str, ...] = ISTIO_KINDS if self.flavour == "istio" else GATEWAY_API_KINDS
        if not self.gateway:
            kinds = tuple(k for k in kinds if k != "Gateway")
        if self.mesh_routing and self.flavour == "istio":
            at = kinds.index("VirtualService") + 1
            kinds = (*kinds[:at], "MeshVirtualService", *kinds[at:])
        return kinds + (("HeadlessService",) if self.headless else ())

    @property
    def image_or_placeholder(self) -> str:
        return self.image or f"registry.invalid/{self.name}:set-the-image-with---image"

    @property
    def gateway_ref(self) -> str:
        return self.gateway_name or f"{self.name}-gateway"


def seconds(value: float) -> str:
    """A duration as Istio and Kubernetes write it: ``5s``, ``1.5s``, ``250ms``."""
    millis = round(value * 1000)
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


def grace_period(config: Config) -> int:
    """``terminationGracePeriodSeconds``: the app's drain delay + grace + shutdown timeout + a margin."""
    return math.ceil(config.drain_delay + config.grace + config.shutdown_timeout) + EXIT_MARGIN


def _labels(options: RoutesOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": options.name, "app.kubernetes.io/managed-by": "meshrpc"}


def _selector(options: RoutesOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": options.name}


def _metadata(options: RoutesOptions, name: str | None = None) -> dict[str, Any]:
    return {"name": name or options.name, "namespace": options.namespace, "labels": _labels(options)}


def _fqdn(options: RoutesOptions) -> str:
    return f"{options.name}.{options.namespace}.svc.cluster.local"


def deployment(options: RoutesOptions, config: Config) -> dict[str, Any]:
    port = config.port
    env = [
        {"name": "MESHRPC_APP", "value": options.app_ref},
        {"name": env_name("port"), "value": str(port)},
        {"name": env_name("drain_delay"), "value": repr(float(config.drain_delay))},
        {"name": env_name("grace"), "value": repr(float(config.grace))},
        {"name": env_name("liveness_service"), "value": config.liveness_service},
        {"name": env_name("pod_annotations_path"), "value": f"{PODINFO_DIR}/annotations"},
    ]
    drain_total = grace_period(config)
    proxy_config = (
        "holdApplicationUntilProxyStarts: true\n"
        # The classic sidecar must outlive the app's whole drain (Istio's default is 5s).
        f"terminationDrainDuration: {drain_total}s\n"
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(options),
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": _selector(options)},
            "template": {
                "metadata": {
                    "labels": {**_labels(options), "app": options.name},
                    "annotations": {"proxy.istio.io/config": proxy_config},
                },
                "spec": {
                    "terminationGracePeriodSeconds": drain_total,
                    "automountServiceAccountToken": False,
                    # Replicas on different nodes where possible: one node's drain or loss
                    # then takes one replica, which is what the PodDisruptionBudget assumes.
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "labelSelector": {"matchLabels": _selector(options)},
                                        "topologyKey": "kubernetes.io/hostname",
                                    },
                                }
                            ]
                        }
                    },
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": options.name,
                            "image": options.image_or_placeholder,
                            "command": ["meshrpc", "serve"],
                            "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"}],
                            "env": env,
                            # Readiness on "" (NOT_SERVING while draining), liveness on its own name.
                            "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 2, "failureThreshold": 1},
                            "livenessProbe": {
                                "grpc": {"port": port, "service": config.liveness_service},
                                "periodSeconds": 10,
                                "failureThreshold": 3,
                            },
                            # Startup (lifespan, sidecar wait) may take a while; liveness waits for it.
                            "startupProbe": {
                                "grpc": {"port": port, "service": config.liveness_service},
                                "periodSeconds": 2,
                                "failureThreshold": math.ceil(config.sidecar_ready_timeout / 2) + 15,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "podinfo", "mountPath": PODINFO_DIR, "readOnly": True}],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "podinfo",
                            "downwardAPI": {
                                "items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
                            },
                        }
                    ],
                },
            },
        },
    }


def service(options: RoutesOptions, config: Config, *, headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": _selector(options),
        "ports": [
            {"name": "grpc", "port": config.port, "targetPort": config.port, "protocol": "TCP", "appProtocol": "grpc"}
        ],
    }
    if headless:
        # One DNS record per pod, for client-side round-robin without a mesh.
        spec = {"clusterIP": "None", **spec, "publishNotReadyAddresses": False}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(options, f"{options.name}-headless" if headless else None),
        "spec": spec,
    }


def pod_disruption_budget(options: RoutesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(options),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(options)}},
    }


def istio_gateway(options: RoutesOptions) -> dict[str, Any]:
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
            **_metadata(options, options.gateway_ref),
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


def _route_name(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


def _http_routes(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> list[dict[str, Any]]:
    destination = {"host": _fqdn(options), "port": {"number": config.port}}
    http: list[dict[str, Any]] = []
    # Exact method routes first: Istio takes the first match.
    for svc in services:
        for method in svc.methods:
            if method.route is not None:
                http.append(
                    {
                        "name": _route_name(svc.name, method.name),
                        "match": [{"uri": {"exact": method.path}}],
                        "route": [{"destination": destination}],
                        **_route_policy(method.route),
                    }
                )
    for svc in services:
        http.append(
            {
                "name": _route_name(svc.name),
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
        "metadata": _metadata(options),
        "spec": {"hosts": list(options.hosts), "gateways": [gateway], "http": _http_routes(options, config, services)},
    }


def mesh_virtual_service(options: RoutesOptions, config: Config, services: Sequence[ServiceSpec]) -> dict[str, Any]:
    """In-mesh routes (``--mesh-routing``): the same policies for calls from other pods.

    A VirtualService of its own, because Istio rejects the host '*' on one bound to
    the mesh gateway; it ends with a catch-all, so in-mesh clients can still reach
    health and reflection on the Service (the sidecar answers 404 to unrouted paths).
    """
    destination = {"host": _fqdn(options), "port": {"number": config.port}}
    http = [*_http_routes(options, config, services), {"name": "default", "route": [{"destination": destination}]}]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _metadata(options, f"{options.name}-mesh"),
        "spec": {"hosts": [_fqdn(options)], "gateways": ["mesh"], "http": http},
    }


def destination_rule(options: RoutesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": _metadata(options),
        "spec": {
            "host": _fqdn(options),
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


def gateway_api_gateway(options: RoutesOptions) -> dict[str, Any]:
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
        "metadata": {
            **_metadata(options, options.gateway_ref),
            "namespace": options.gateway_namespace or options.namespace,
        },
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
                        "name": _route_name(svc.name, method.name),
                        "matches": [{"method": {"type": "Exact", "service": svc.name, "method": method.name}}],
                        "backendRefs": backend,
                    }
                )
    for svc in services:
        rules.append(
            {
                "name": _route_name(svc.name),
                "matches": [{"method": {"type": "Exact", "service": svc.name}}],
                "backendRefs": backend,
            }
        )
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
        "metadata": _metadata(options),
        "spec": spec,
    }


def notes(options: RoutesOptions, services: Sequence[ServiceSpec]) -> list[str]:
    """Things the user should know about the output (printed to stderr, never into the YAML)."""
    found = []
    if options.image is None and "Deployment" in options.kinds:
        found.append(f"no --image given: the Deployment uses the placeholder {options.image_or_placeholder}")
    if options.flavour == "gateway-api":
        has_policy = any(s.route for s in services) or any(m.route for s in services for m in s.methods)
        if has_policy:
            found.append(
                "timeouts and retries from @meshrpc.route are not part of GRPCRoute (Gateway API v1 standard); "
                "they are written only by the istio flavour"
            )
    return found


def manifests(services: Sequence[ServiceSpec], config: Config, options: RoutesOptions) -> list[dict[str, Any]]:
    """Every resource for the app, in a fixed order."""
    if not services:
        raise RoutesError(f"app {options.name!r} registers no services: there is nothing to route")
    if not 1 <= config.port <= 65535:
        raise RoutesError(f"port must be 1..65535 in a manifest, got {config.port}")
    builders = {
        "Deployment": lambda: deployment(options, config),
        "Service": lambda: service(options, config),
        "HeadlessService": lambda: service(options, config, headless=True),
        "Gateway": lambda: istio_gateway(options) if options.flavour == "istio" else gateway_api_gateway(options),
        "VirtualService": lambda: virtual_service(options, config, services),
        "MeshVirtualService": lambda: mesh_virtual_service(options, config, services),
        "DestinationRule": lambda: destination_rule(options),
        "GRPCRoute": lambda: grpc_route(options, config, services),
        "PodDisruptionBudget": lambda: pod_disruption_budget(options),
    }
    return [builders[kind]() for kind in options.kinds]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # repeated destinations stay written out: no &id001 anchors


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(documents: Sequence[dict[str, Any]], header: str) -> str:
    """Multi-document YAML, keys in the order built, with ``header`` as leading comments."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    body = yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=1000)
    return comment + body


def header(app_name: str, app_ref: str) -> str:
    return (
        f"Generated by meshrpc {__version__} from app {app_name} ({app_ref}).\n"
        "Do not edit: change the app or the options and run meshrpc routes again."
    )


def file_name(document: dict[str, Any]) -> str:
    kind = str(document["kind"]).lower()
    return f"{kind}-{document['metadata']['name']}.yaml"
