"""Who may call: ServiceAccount, AuthorizationPolicy, PeerAuthentication."""

from __future__ import annotations

import re

import pytest

from tests.manifests.helpers import container, generate, pod_labels, routes
from tests.schemas import validate

APP = "examples.multi.app:app"
PRINCIPAL = re.compile(r"^[a-z0-9.-]+/ns/[a-z0-9-]+/sa/[a-z0-9.-]+$")


def test_the_app_runs_as_its_own_service_account() -> None:
    kinds = generate(APP, "--image", "acme/main:1")
    account = kinds["ServiceAccount"]
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "main"
    assert account["metadata"]["namespace"] == kinds["Deployment"]["metadata"]["namespace"]
    assert account["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    validate(account)


def test_the_policy_lets_the_gateway_and_named_callers_reach_the_services_only() -> None:
    kinds = generate(APP, "--namespace", "shop", "--allow-from", "payments/checkout", "--allow-from", "ops")
    policy = kinds["AuthorizationPolicy"]
    validate(policy)
    spec = policy["spec"]
    assert policy["apiVersion"] == "security.istio.io/v1" and spec["action"] == "ALLOW"
    assert spec["selector"]["matchLabels"].items() <= pod_labels(kinds).items()  # it selects the app's pods
    gateway, named, namespaces, metrics = spec["rules"]
    assert gateway["from"] == [
        {"source": {"principals": ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]}}
    ]
    assert named["from"] == [{"source": {"principals": ["cluster.local/ns/payments/sa/checkout"]}}]
    assert namespaces["from"] == [{"source": {"namespaces": ["ops"]}}]
    principals = [p for rule in spec["rules"] for f in rule.get("from", []) for p in f["source"].get("principals", [])]
    assert principals and all(PRINCIPAL.match(p) for p in principals)
    # L4 only by default: the gRPC port, which ztunnel can enforce (paths would make it DENY all).
    for rule in (gateway, named, namespaces):
        assert rule["to"] == [{"operation": {"ports": ["8888"]}}]
    assert "grpc.health" not in str(spec) and "grpc.reflection" not in str(spec)
    # /metrics, on its own port, for a scraper without Istio's metrics merging.
    assert metrics == {"to": [{"operation": {"ports": ["9464"]}}]}
    assert "from" not in metrics
    # Declared sidecar-only, the pods' sidecar enforces paths: the registered services only.
    sidecar = generate(APP, "--namespace", "shop", "--allow-from", "ops", "--data-plane", "sidecar")
    gateway, _, metrics = sidecar["AuthorizationPolicy"]["spec"]["rules"]
    paths = ["/main.MainService/*", "/helloworld.Greeter/*"]
    assert gateway["to"] == [{"operation": {"ports": ["8888"], "paths": paths}}]
    assert metrics == {"to": [{"operation": {"ports": ["9464"], "methods": ["GET"], "paths": ["/metrics"]}}]}
    validate(sidecar["AuthorizationPolicy"])


def test_without_allow_from_stderr_says_only_the_gateway_may_call() -> None:
    result = routes(APP)
    assert result.returncode == 0, result.stderr
    assert "lets only the gateway" in result.stderr and "--allow-from" in result.stderr


def test_mtls_strict_writes_a_peer_authentication() -> None:
    kinds = generate(APP, "--mtls", "strict")
    peer = kinds["PeerAuthentication"]
    validate(peer)  # with the CRDs: its CEL rule wants a selector for portLevelMtls
    assert peer["spec"]["mtls"] == {"mode": "STRICT"}
    assert peer["spec"]["selector"]["matchLabels"].items() <= pod_labels(kinds).items()
    metrics_port = next(p for p in container(kinds)["ports"] if p["name"] == "http-metrics")["containerPort"]
    assert peer["spec"]["portLevelMtls"] == {str(metrics_port): {"mode": "PERMISSIVE"}}
    assert "PeerAuthentication" not in generate(APP)  # only when asked for
    assert generate(APP, "--mtls", "permissive")["PeerAuthentication"]["spec"]["mtls"] == {"mode": "PERMISSIVE"}


def test_gateway_api_on_istio_names_the_gateway_istio_deploys() -> None:
    kinds = generate(APP, "--api", "gateway-api", "--gateway-namespace", "edge")
    rule = kinds["AuthorizationPolicy"]["spec"]["rules"][0]
    # Istio runs a Gateway API Gateway as the service account NAME-CLASS in the Gateway's namespace.
    assert rule["from"][0]["source"]["principals"] == ["cluster.local/ns/edge/sa/meshrpc-gateway-istio"]
    validate(kinds["AuthorizationPolicy"])


def test_without_istio_stderr_says_what_is_not_enforced() -> None:
    result = routes(APP, "--api", "gateway-api", "--gateway-class", "cilium", "--mtls", "strict")
    assert result.returncode == 0, result.stderr
    assert "AuthorizationPolicy" not in result.stdout and "PeerAuthentication" not in result.stdout
    assert "NOT enforced" in result.stderr


def test_the_policy_can_be_left_out_and_the_gateway_principal_changed() -> None:
    assert "AuthorizationPolicy" not in generate(APP, "--no-authorization-policy")
    kinds = generate(APP, "--gateway-principal", "corp.example/ns/gw/sa/edge", "--trust-domain", "corp.example")
    rules = kinds["AuthorizationPolicy"]["spec"]["rules"]
    assert rules[0]["from"][0]["source"]["principals"] == ["corp.example/ns/gw/sa/edge"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--allow-from", "Shop/x"), "--allow-from 'Shop/x' is not NAMESPACE or NAMESPACE/SERVICEACCOUNT"),
        (("--gateway-principal", "istio-ingressgateway"), "is not TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICEACCOUNT"),
        (("--trust-domain", "not a domain"), "trust domain 'not a domain' is not a DNS name"),
    ],
)
def test_bad_security_options_are_clear_errors(args: tuple[str, ...], message: str) -> None:
    result = routes(APP, *args)
    assert result.returncode == 1 and result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr
