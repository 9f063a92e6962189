"""What ``meshrpc routes`` is told beyond the app itself, validated once."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from .._config import Config
from .._errors import MeshrpcError

Flavour = Literal["istio", "gateway-api"]
MtlsMode = Literal["strict", "permissive"]
# How the Istio ingress gateway was installed: each gives its pods a label and an identity.
Ingress = Literal["istioctl", "helm"]
# Which data plane the app's pods run in: "any" writes what both enforce (L4 policy only).
DataPlane = Literal["any", "sidecar", "ambient"]

# Every kind in the order it is written: identity first, then the workload, the routes, the policy.
ISTIO_KINDS = (
    "ServiceAccount",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "Gateway",
    "VirtualService",
    "DestinationRule",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "PodDisruptionBudget",
)
GATEWAY_API_KINDS = (
    "ServiceAccount",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "Gateway",
    "GRPCRoute",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "PodDisruptionBudget",
)
# Kinds written only when asked for (--mesh-routing, --headless, --waypoint, --network-policy,
# --pod-monitor); "which resources" accepts them too.
OPTIONAL_KINDS = ("MeshVirtualService", "HeadlessService", "WaypointPolicy", "NetworkPolicy", "PodMonitor")
KILL_MARGIN = 1  # seconds past the process's own exit budget before the kubelet's SIGKILL
# What each ingress install gives the gateway's pods: (selector label, namespace, service account).
# istioctl's default profile: the istio-ingressgateway deployment in istio-system.  Istio's Helm
# docs: `helm install istio-ingress istio/gateway -n istio-ingress`, whose chart labels the
# pods `istio: ingress` (the release name without "istio-") and runs them as the release's
# own service account.
INGRESS_INSTALLS: dict[str, tuple[tuple[str, str], str, str]] = {
    "istioctl": (("istio", "ingressgateway"), "istio-system", "istio-ingressgateway-service-account"),
    "helm": (("istio", "ingress"), "istio-ingress", "istio-ingress"),
}
# The one Gateway every app shares by default: two apps on their defaults write the same
# resource (one listener, one load balancer), never two Gateways on one port and host (IST0145).
SHARED_GATEWAY = "meshrpc-gateway"
DEFAULT_METRICS_PORT = 9464  # the port OpenTelemetry's Prometheus exporter uses by default

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# An Istio principal: <trust domain>/ns/<namespace>/sa/<service account>.
_PRINCIPAL = re.compile(
    r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/ns/[a-z0-9]([-a-z0-9]*[a-z0-9])?/sa/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
)
# What Kubernetes accepts as an environment variable name (C identifiers, and more, but no '=').
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_CPU = re.compile(r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$")
_MEMORY = re.compile(r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    number = re.match(r"^[0-9]+", quantity)
    assert number is not None
    return int(number.group()) * _UNITS[quantity[number.end() :]]


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
    gateway_selector: tuple[tuple[str, str], ...] | None = None  # None: the --ingress install's label
    ingress: Ingress = "istioctl"
    data_plane: DataPlane = "any"
    waypoint: str | None = None  # the ambient waypoint serving the app's Service, by name
    gateway_class: str = "istio"
    gateway_port: int | None = None
    tls_secret: str | None = None
    mesh_routing: bool = False
    headless: bool = False
    resources: tuple[str, ...] | None = None
    # Who may call (Istio security).
    authorization: bool = True
    gateway_principal: str | None = None  # None: the default ingress gateway's, see below
    trust_domain: str = "cluster.local"
    allow_from: tuple[str, ...] = ()  # "NAMESPACE" or "NAMESPACE/SERVICEACCOUNT"
    mtls: MtlsMode | None = None
    # How it scales.
    autoscaling: bool = True
    max_replicas: int = 10
    target_cpu: int = 70
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    memory_limit: str = "512Mi"
    # How it is scraped.
    metrics_port: int | None = DEFAULT_METRICS_PORT
    # What the app needs from its environment.
    env: tuple[tuple[str, str], ...] = ()
    env_from: tuple[str, ...] = ()  # "configmap:NAME" or "secret:NAME"
    network_policy: bool = False
    pod_monitor: bool = False

    def __post_init__(self) -> None:
        self._check_workload()
        self._check_gateway()
        self._check_security()
        self._check_environment()
        if self.resources is not None:
            if not self.autoscaling and "HorizontalPodAutoscaler" in self.resources:
                raise RoutesError("--no-autoscaling contradicts --resources HorizontalPodAutoscaler: choose one")
            known = set(self.kinds_available)
            unknown = [r for r in self.resources if r not in known]
            if unknown:
                raise RoutesError(
                    f"unknown resource(s) {', '.join(unknown)} for flavour {self.flavour}; "
                    f"choose from {', '.join(self.kinds_available)}"
                )

    def _check_workload(self) -> None:
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
        if self.max_replicas < self.replicas:
            raise RoutesError(
                f"max replicas ({self.max_replicas}) must be at least the replicas ({self.replicas}), "
                "which are the autoscaler's minimum"
            )
        if not 1 <= self.target_cpu <= 100:
            raise RoutesError(f"target CPU must be 1..100 (% of the CPU request), got {self.target_cpu}")
        if not _CPU.match(self.cpu_request) or self.cpu_request in ("0", "0m"):
            raise RoutesError(f"CPU request {self.cpu_request!r} is not a CPU quantity such as 100m or 0.5")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise RoutesError(f"metrics port must be 1..65535, got {self.metrics_port}")
        for what, quantity in (("memory request", self.memory_request), ("memory limit", self.memory_limit)):
            if not _MEMORY.match(quantity) or memory_bytes(quantity) == 0:
                raise RoutesError(f"{what} {quantity!r} is not a memory quantity such as 128Mi or 1Gi")
        if memory_bytes(self.memory_limit) < memory_bytes(self.memory_request):
            raise RoutesError(
                f"memory limit ({self.memory_limit}) must be at least the memory request ({self.memory_request})"
            )

    def _check_gateway(self) -> None:
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
        for key, value in self.gateway_selector or ():
            if not key or not _LABEL_VALUE.match(value):
                raise RoutesError(f"gateway selector {key}={value} is not a valid label")
        if self.ingress not in INGRESS_INSTALLS:
            raise RoutesError(f"ingress must be one of {', '.join(INGRESS_INSTALLS)}, got {self.ingress!r}")

    def _check_security(self) -> None:
        if self.gateway_principal is not None and not _PRINCIPAL.match(self.gateway_principal):
            raise RoutesError(
                f"gateway principal {self.gateway_principal!r} is not TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICEACCOUNT"
            )
        if not _DNS_SUBDOMAIN.match(self.trust_domain):
            raise RoutesError(f"trust domain {self.trust_domain!r} is not a DNS name")
        for caller in self.allow_from:
            namespace, _, account = caller.partition("/")
            if not _DNS_1123_LABEL.match(namespace) or (account and not _DNS_SUBDOMAIN.match(account)):
                raise RoutesError(f"--allow-from {caller!r} is not NAMESPACE or NAMESPACE/SERVICEACCOUNT")
        if self.mtls not in (None, "strict", "permissive"):
            raise RoutesError(f"mtls must be strict or permissive, got {self.mtls!r}")
        if self.data_plane not in ("any", "sidecar", "ambient"):
            raise RoutesError(f"data plane must be any, sidecar or ambient, got {self.data_plane!r}")
        if self.waypoint is not None:
            if not _DNS_1123_LABEL.match(self.waypoint):
                raise RoutesError(f"waypoint {self.waypoint!r} is not a valid Kubernetes name")
            if self.data_plane == "sidecar":
                raise RoutesError("--waypoint is for the ambient data plane; --data-plane sidecar has no waypoint")

    def _check_environment(self) -> None:
        names = [name for name, _ in self.env]
        for name in names:
            if not _ENV_NAME.match(name):
                raise RoutesError(f"--env {name!r} is not a valid environment variable name")
            if name == "MESHRPC_APP" or name in self.meshrpc_env_names:
                raise RoutesError(f"--env {name}: meshrpc sets it itself from the app and the options")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise RoutesError(f"--env {', '.join(repeated)} given more than once")
        for source in self.env_from:
            kind, _, ref = source.partition(":")
            if kind not in ("configmap", "secret") or not _DNS_SUBDOMAIN.match(ref):
                raise RoutesError(f"--env-from {source!r} is not configmap:NAME or secret:NAME")

    @property
    def meshrpc_env_names(self) -> frozenset[str]:
        """The variables the Deployment sets for meshrpc itself."""
        names = {
            "MESHRPC_HOST",
            "MESHRPC_PORT",
            "MESHRPC_DRAIN_DELAY",
            "MESHRPC_GRACE",
            "MESHRPC_LIVENESS_SERVICE",
            "MESHRPC_POD_ANNOTATIONS_PATH",
        }
        if self.metrics_port is not None:
            names.add("MESHRPC_METRICS_PORT")
        return frozenset(names)

    @property
    def istio_security(self) -> bool:
        """Whether Istio's security kinds apply: the istio flavour, or Gateway API served by Istio."""
        return self.flavour == "istio" or self.gateway_class == "istio"

    @property
    def kinds_available(self) -> tuple[str, ...]:
        return (ISTIO_KINDS if self.flavour == "istio" else GATEWAY_API_KINDS) + OPTIONAL_KINDS

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.resources is not None:
            wanted = set(self.resources)
            if "VirtualService" in wanted and self.mesh_routing:
                wanted.add("MeshVirtualService")  # both are VirtualServices: asking for the kind gets both
            if "AuthorizationPolicy" in wanted and self.waypoint is not None:
                wanted.add("WaypointPolicy")
            return tuple(k for k in self.kinds_available if k in wanted)
        kinds: tuple[str, ...] = ISTIO_KINDS if self.flavour == "istio" else GATEWAY_API_KINDS
        left_out = set()
        if not self.gateway:
            left_out.add("Gateway")
        if not self.autoscaling:
            left_out.add("HorizontalPodAutoscaler")
        if not self.authorization or not self.istio_security:
            left_out.add("AuthorizationPolicy")
        if self.mtls is None or not self.istio_security:
            left_out.add("PeerAuthentication")
        kinds = tuple(k for k in kinds if k not in left_out)
        if self.mesh_routing and self.flavour == "istio":
            at = kinds.index("VirtualService") + 1
            kinds = (*kinds[:at], "MeshVirtualService", *kinds[at:])
        if self.waypoint is not None and "AuthorizationPolicy" in kinds:
            at = kinds.index("AuthorizationPolicy") + 1
            kinds = (*kinds[:at], "WaypointPolicy", *kinds[at:])
        extra = (
            ("HeadlessService", self.headless),
            ("NetworkPolicy", self.network_policy),
            ("PodMonitor", self.pod_monitor and self.metrics_port is not None),
        )
        return kinds + tuple(kind for kind, wanted in extra if wanted)

    @property
    def autoscaled(self) -> bool:
        """The HorizontalPodAutoscaler is written, so it, not the Deployment, owns the replica count."""
        return "HorizontalPodAutoscaler" in self.kinds

    @property
    def image_or_placeholder(self) -> str:
        return self.image or f"registry.invalid/{self.name}:set-the-image-with---image"

    @property
    def gateway_ref(self) -> str:
        return self.gateway_name or SHARED_GATEWAY

    @property
    def gateway_selector_or_default(self) -> dict[str, str]:
        """The Istio Gateway's pod selector: the one given, else the ingress install's label."""
        if self.gateway_selector:
            return dict(self.gateway_selector)
        key, value = INGRESS_INSTALLS[self.ingress][0]
        return {key: value}

    @property
    def gateway_pod_namespace(self) -> str:
        """Where the gateway's pods run (for a NetworkPolicy that admits them)."""
        if self.flavour == "gateway-api":
            return self.gateway_namespace or self.namespace
        return INGRESS_INSTALLS[self.ingress][1]

    @property
    def l7_on_pods(self) -> bool:
        """Whether the policy on the pods may match paths: only a sidecar enforces L7 there.

        Istio, ambient L4 policy: "The ztunnel cannot enforce L7 policies. If a policy with
        rules matching L7 attributes ... is targeted such that it will be enforced by a
        receiving ztunnel, it will fail safe by becoming a DENY policy."
        """
        return self.data_plane == "sidecar"

    @property
    def version_label(self) -> str:
        """The image's tag, as a label value (Istio's telemetry reads ``version``)."""
        image = self.image or ""
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] and "@" not in image else ""
        tag = re.sub(r"[^A-Za-z0-9_.-]", "-", tag)[:63].strip("-_.")
        return tag or "unversioned"

    @property
    def gateway_principal_or_default(self) -> str:
        """Who the gateway is in the mesh.

        Istio's ingress gateway by default; for the Gateway API on Istio, the gateway Istio
        deploys for the Gateway resource runs as the service account ``NAME-CLASS``
        (``main-gateway-istio``) in the Gateway's namespace.
        """
        if self.gateway_principal is not None:
            return self.gateway_principal
        if self.flavour == "gateway-api":
            namespace = self.gateway_namespace or self.namespace
            return f"{self.trust_domain}/ns/{namespace}/sa/{self.gateway_ref}-{self.gateway_class}"
        _, namespace, account = INGRESS_INSTALLS[self.ingress]
        return f"{self.trust_domain}/ns/{namespace}/sa/{account}"

    @property
    def waypoint_principal(self) -> str | None:
        """The waypoint's identity: what the receiving ztunnel sees as the source of calls it forwards."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.waypoint}" if self.waypoint else None

    @property
    def principal(self) -> str:
        """This app's own mesh identity (its ServiceAccount's), as AuthorizationPolicy writes principals."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.name}"

    def caller_principals(self) -> tuple[list[str], list[str]]:
        """``--allow-from`` as (principals, namespaces)."""
        principals, namespaces = [], []
        for caller in self.allow_from:
            namespace, _, account = caller.partition("/")
            if account:
                principals.append(f"{self.trust_domain}/ns/{namespace}/sa/{account}")
            else:
                namespaces.append(namespace)
        return principals, namespaces


def seconds(value: float) -> str:
    """A duration as Istio and Kubernetes write it: ``5s``, ``1.5s``, ``250ms``."""
    millis = round(value * 1000)
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


def grace_period(config: Config) -> int:
    """``terminationGracePeriodSeconds``: the app's exit budget (drain delay + grace + shutdown
    timeout + its exit margin, when its watchdog ends it at the latest), rounded up, plus a
    second, so the process always ends and logs it before the kubelet's SIGKILL."""
    return math.ceil(config.exit_budget) + KILL_MARGIN
