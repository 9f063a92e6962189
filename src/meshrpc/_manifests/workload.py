"""The workload: ServiceAccount, Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget."""

from __future__ import annotations

import math
from typing import Any

from .._config import POD_HOST, Config, env_name
from .options import RoutesOptions, grace_period

PODINFO_DIR = "/etc/podinfo"
# The fastest the autoscaler may remove replicas: one per drain budget (see horizontal_pod_autoscaler).
SCALE_DOWN_WINDOW = 300


def labels(options: RoutesOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": options.name, "app.kubernetes.io/managed-by": "meshrpc"}


def selector(options: RoutesOptions) -> dict[str, str]:
    """The pods' selector labels: what the Service, the PDB, the HPA and the policies select."""
    return {"app.kubernetes.io/name": options.name}


def metadata(options: RoutesOptions, name: str | None = None) -> dict[str, Any]:
    return {"name": name or options.name, "namespace": options.namespace, "labels": labels(options)}


def fqdn(options: RoutesOptions) -> str:
    return f"{options.name}.{options.namespace}.svc.cluster.local"


def service_account(options: RoutesOptions) -> dict[str, Any]:
    """The app's own identity: its pods are spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/NAME in the mesh."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(options),
        # The app never calls the Kubernetes API; Istio mounts a token of its own for the mesh.
        "automountServiceAccountToken": False,
    }


def _env(options: RoutesOptions, config: Config) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "MESHRPC_APP", "value": options.app_ref},
        # Every address: the sidecar forwards calls to the pod's own address, and the kubelet probes it there.
        {"name": env_name("host"), "value": POD_HOST},
        {"name": env_name("port"), "value": str(config.port)},
        {"name": env_name("drain_delay"), "value": repr(float(config.drain_delay))},
        {"name": env_name("grace"), "value": repr(float(config.grace))},
        {"name": env_name("liveness_service"), "value": config.liveness_service},
        {"name": env_name("pod_annotations_path"), "value": f"{PODINFO_DIR}/annotations"},
    ]
    if options.metrics_port is not None:
        env.append({"name": env_name("metrics_port"), "value": str(options.metrics_port)})
    env += [{"name": name, "value": value} for name, value in options.env]
    return env


def _env_from(options: RoutesOptions) -> list[dict[str, Any]]:
    sources = []
    for source in options.env_from:
        kind, _, name = source.partition(":")
        key = "configMapRef" if kind == "configmap" else "secretRef"
        sources.append({key: {"name": name}})
    return sources


def deployment(options: RoutesOptions, config: Config) -> dict[str, Any]:
    port = config.port
    drain_total = grace_period(config)
    proxy_config = (
        "holdApplicationUntilProxyStarts: true\n"
        # The classic sidecar must outlive the app's whole drain (Istio's default is 5s)...
        f"terminationDrainDuration: {drain_total}s\n"
        # ...but no longer than the app's connections: once the drain delay is over (the app
        # accepts calls until then), it exits when the last connection is gone.
        "proxyMetadata:\n"
        '  EXIT_ON_ZERO_ACTIVE_CONNECTIONS: "true"\n'
        f"  MINIMUM_DRAIN_DURATION: {math.ceil(config.drain_delay) + 1}s\n"
    )
    annotations = {
        "proxy.istio.io/config": proxy_config,
        # The gRPC probes go through the sidecar's agent whatever the mesh-wide default says.
        "sidecar.istio.io/rewriteAppHTTPProbers": "true",
    }
    ports = [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
    if options.metrics_port is not None:
        # Prometheus finds the pod by these; with a sidecar, Istio's metrics merging rewrites
        # them to its agent (:15020/stats/prometheus), which scrapes this port and merges it.
        annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(options.metrics_port),
                "prometheus.io/path": "/metrics",
            }
        )
        ports.append({"name": "http-metrics", "containerPort": options.metrics_port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": options.name,
        "image": options.image_or_placeholder,
        "command": ["meshrpc", "serve"],
        "ports": ports,
        "env": _env(options, config),
    }
    if options.env_from:
        container["envFrom"] = _env_from(options)
    container.update(
        {
            # Readiness on "" (NOT_SERVING while draining), liveness on its own name.  A
            # terminating pod leaves the endpoints at once (its deletion makes it unready), so
            # readiness need not be quick: it pulls a pod after three failed probes over 10-15 s
            # (a failing check, a lost sidecar), not after one event-loop stall of a second.
            "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3},
            "livenessProbe": {
                "grpc": {"port": port, "service": config.liveness_service},
                "periodSeconds": 10,
                "timeoutSeconds": 2,
                "failureThreshold": 3,
            },
            # Startup (lifespan, sidecar wait) may take a while; liveness waits for it.
            "startupProbe": {
                "grpc": {"port": port, "service": config.liveness_service},
                "periodSeconds": 2,
                "failureThreshold": math.ceil(config.sidecar_ready_timeout / 2) + 15,
            },
            # The CPU request is what the autoscaler's utilisation is a percentage of.
            "resources": {
                "requests": {"cpu": options.cpu_request, "memory": options.memory_request},
                "limits": {"memory": options.memory_limit},
            },
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "podinfo", "mountPath": PODINFO_DIR, "readOnly": True},
                # The root filesystem is read-only; Python's tempfile and libraries need /tmp.
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
    )
    spec: dict[str, Any] = {}
    if not options.autoscaled:
        # With an autoscaler the replica count is its to set: a replicas field here would make
        # every `kubectl apply` reset what it scaled to.
        spec["replicas"] = options.replicas
    spec.update(
        {
            "selector": {"matchLabels": selector(options)},
            "template": {
                "metadata": {
                    "labels": {
                        **labels(options),
                        "app": options.name,
                        # Istio's telemetry and Kiali read the workload's version from these.
                        "app.kubernetes.io/version": options.version_label,
                        "version": options.version_label,
                    },
                    "annotations": annotations,
                },
                "spec": {
                    "serviceAccountName": options.name,
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
                                        "labelSelector": {"matchLabels": selector(options)},
                                        "topologyKey": "kubernetes.io/hostname",
                                    },
                                }
                            ]
                        }
                    },
                    # Across zones too, where the scheduler can: a zone's outage takes some replicas, not all.
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "topology.kubernetes.io/zone",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector(options)},
                        }
                    ],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "podinfo",
                            "downwardAPI": {
                                "items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
                            },
                        },
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        }
    )
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(options), "spec": spec}


def service(options: RoutesOptions, config: Config, *, headless: bool = False) -> dict[str, Any]:
    # Only the gRPC port: the metrics port is scraped on the pods, never routed.
    spec: dict[str, Any] = {
        "selector": selector(options),
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
        "metadata": metadata(options, f"{options.name}-headless" if headless else None),
        "spec": spec,
    }


def horizontal_pod_autoscaler(options: RoutesOptions, config: Config) -> dict[str, Any]:
    """CPU-based scaling between --replicas and --max-replicas.

    Scaling down removes a pod through the whole drain (readiness off, drain delay, grace),
    so it is held back: the recommendation must stay low for the stabilisation window, and
    at most one pod goes per termination grace period, the time one pod's drain may take.
    """
    drain = grace_period(config)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(options),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": options.name},
            "minReplicas": options.replicas,
            "maxReplicas": options.max_replicas,
            # The app container's CPU alone (ContainerResource, stable since Kubernetes 1.30): a
            # pod's "Resource" utilisation averages in the sidecar, and an app at 120 % of its
            # request beside an idle proxy reads about 65 %, so nothing would scale.
            "metrics": [
                {
                    "type": "ContainerResource",
                    "containerResource": {
                        "name": "cpu",
                        "container": options.name,
                        "target": {"type": "Utilization", "averageUtilization": options.target_cpu},
                    },
                }
            ],
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": min(max(SCALE_DOWN_WINDOW, drain), 3600),  # the API's limit
                    "selectPolicy": "Min",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": min(drain, 1800)}],
                }
            },
        },
    }


def pod_disruption_budget(options: RoutesOptions) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(options),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(options)},
            # A crash-looping pod must not block a node drain: it serves nothing, so evicting it
            # costs nothing (Kubernetes 1.31 GA; the default, IfHealthyBudget, would wait).
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


HBONE_PORT = 15008  # ambient: ztunnel delivers every call to the pod on this port
AGENT_PORT = 15020  # sidecar: the agent's merged /stats/prometheus, what Prometheus scrapes


def network_policy(options: RoutesOptions, config: Config) -> dict[str, Any]:
    """Kubernetes NetworkPolicy (``--network-policy``): defence in depth under the mesh's own
    policy.  Calls come from the gateway's namespace and the ``--allow-from`` namespaces,
    on the gRPC port and, in ambient, on ztunnel's HBONE port 15008 (Istio's ambient docs:
    a NetworkPolicy must allow it); scrapers reach the metrics ports.  The kubelet's probes
    are always let in: "traffic to and from the node where a Pod is running is always
    allowed" (Kubernetes docs)."""
    namespaces = sorted({options.gateway_pod_namespace, *(c.partition("/")[0] for c in options.allow_from)})
    callers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": n}}} for n in namespaces]
    grpc_ports = [{"protocol": "TCP", "port": config.port}]
    if options.data_plane != "sidecar":
        grpc_ports.append({"protocol": "TCP", "port": HBONE_PORT})
    ingress: list[dict[str, Any]] = [{"from": callers, "ports": grpc_ports}]
    if options.metrics_port is not None:
        scrape = [{"protocol": "TCP", "port": options.metrics_port}]
        if options.data_plane != "ambient":
            scrape.append({"protocol": "TCP", "port": AGENT_PORT})
        ingress.append({"ports": scrape})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(options),
        "spec": {"podSelector": {"matchLabels": selector(options)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def pod_monitor(options: RoutesOptions) -> dict[str, Any]:
    """The Prometheus Operator's PodMonitor (``--pod-monitor``): scrapes ``http-metrics`` on each pod."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata(options),
        "spec": {
            "selector": {"matchLabels": selector(options)},
            "podMetricsEndpoints": [{"port": "http-metrics", "path": "/metrics"}],
        },
    }
