"""meshrpc routes: manifests that validate, agree with the app, and say what they mean."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import meshrpc
from examples.greeter.app import app as greeter_app
from examples.multi.app import app as multi_app
from meshrpc._manifests import RoutesError, RoutesOptions, grace_period, manifests
from meshrpc._route_options import RETRY_ON
from tests.helpers import ROOT
from tests.manifests.helpers import by_kind, documents, routes
from tests.schemas import NO_CRDS_REASON, ManifestError, crd_dir, validate

GOLDEN = Path(__file__).parent / "golden"
REMOVED_APIS = ("extensions/v1beta1", "apps/v1beta1", "apps/v1beta2", "v1alpha3", "v1beta1", "policy/v1beta1")


def istio_webhook_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Rules Istio's validating webhook enforces beyond the CRD schema (pkg/config/validation)."""
    problems = []
    for d in docs:
        if d["kind"] != "VirtualService":
            continue
        spec, name = d["spec"], d["metadata"]["name"]
        if "mesh" in spec.get("gateways", ["mesh"]) and "*" in spec["hosts"]:
            problems.append(f"{name}: wildcard host * is not allowed when bound to the mesh gateway")
        names = [r["name"] for r in spec["http"] if "name" in r]
        if len(names) != len(set(names)):
            problems.append(f"{name}: route names repeat")
        if any("match" not in route for route in spec["http"][:-1]):
            problems.append(f"{name}: a catch-all route before the last shadows the rest")
        for route in spec["http"]:
            for condition in (route.get("retries", {}).get("retryOn") or "").split(","):
                if condition and condition not in RETRY_ON and not condition.isdigit():
                    problems.append(f"{name}: retryOn {condition!r} is not a retry policy")
    return problems


@pytest.mark.parametrize(
    "args",
    [
        ("examples.greeter.app:app",),
        ("examples.multi.app:app",),
        (
            "examples.multi.app:app",
            "--mesh-routing",
            "--headless",
            "--tls-secret",
            "main-cert",
            "--host",
            "api.example.com",
        ),
        ("examples.greeter.app:app", "--api", "gateway-api"),
        (
            "examples.multi.app:app",
            "--api",
            "gateway-api",
            "--mesh-routing",
            "--host",
            "api.example.com",
            "--tls-secret",
            "c",
        ),
    ],
)
def test_every_document_validates_strictly(args: tuple[str, ...]) -> None:
    result = routes(*args, "--image", "ghcr.io/acme/app:1.0")
    assert result.returncode == 0, result.stderr
    docs = documents(result.stdout)
    assert len(docs) >= 5
    validate(*docs)
    assert not any(api in d["apiVersion"] for d in docs for api in REMOVED_APIS)
    assert istio_webhook_problems(docs) == []


needs_crds = pytest.mark.skipif(crd_dir() is None, reason=NO_CRDS_REASON)


def test_validator_rejects_what_an_api_server_rejects() -> None:
    docs = manifests(greeter_app.services, greeter_app.config, RoutesOptions(name="greeter", app_ref="x:y"))
    vs = next(d for d in docs if d["kind"] == "VirtualService")
    wrong_type = {**vs, "spec": {**vs["spec"], "hosts": [443]}}  # a number where the CRD says string
    with pytest.raises(ManifestError, match="hosts/0 must be string"):
        validate(wrong_type)
    route = next(
        d
        for d in manifests(
            greeter_app.services, greeter_app.config, RoutesOptions(name="g", app_ref="x:y", flavour="gateway-api")
        )
        if d["kind"] == "GRPCRoute"
    )
    route["spec"]["rules"][0]["matches"][0]["method"]["type"] = "Prefix"  # not a GRPCMethodMatchType
    with pytest.raises(ManifestError, match="GRPCRoute"):
        validate(route)
    shared = {**vs, "spec": {**vs["spec"], "gateways": ["greeter-gateway", "mesh"]}}  # one VS for both
    assert "wildcard host * is not allowed" in istio_webhook_problems([shared])[0]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(Exception, match="readinesProbe"):
        validate(deployment)


@needs_crds
def test_official_crds_reject_unknown_fields() -> None:
    docs = manifests(greeter_app.services, greeter_app.config, RoutesOptions(name="greeter", app_ref="x:y"))
    vs = next(d for d in docs if d["kind"] == "VirtualService")
    vs["spec"]["http"][0]["retires"] = {"attempts": 3}  # a typo: unknown field
    with pytest.raises(jsonschema.ValidationError, match="retires"):
        validate(vs)


def test_main_service_scenario() -> None:
    """One team, one domain: main.MainService on 8888, two replicas, behind a gateway."""
    result = routes("examples.multi.app:app", "--replicas", "2", "--host", "api.example.com", "--image", "acme/main:1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Generated by meshrpc " + meshrpc.__version__ + " from app main")
    kinds = by_kind(documents(result.stdout))
    assert list(kinds) == [
        "ServiceAccount",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Gateway",
        "VirtualService",
        "DestinationRule",
        "AuthorizationPolicy",
        "PodDisruptionBudget",
    ]
    vs = kinds["VirtualService"]
    assert vs["apiVersion"] == "networking.istio.io/v1"
    assert vs["spec"]["gateways"] == [kinds["Gateway"]["metadata"]["name"]]
    assert vs["spec"]["hosts"] == ["api.example.com"]
    prefix_routes = [r for r in vs["spec"]["http"] if "prefix" in r["match"][0]["uri"]]
    main_route = next(r for r in prefix_routes if r["match"][0]["uri"]["prefix"] == "/main.MainService/")
    destination = main_route["route"][0]["destination"]
    assert destination == {"host": "main.default.svc.cluster.local", "port": {"number": 8888}}
    assert main_route["timeout"] == "10s"
    exact = vs["spec"]["http"][0]
    assert exact["match"] == [{"uri": {"exact": "/main.MainService/GetItem"}}]
    assert exact["retries"] == {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "unavailable,reset"}
    assert (
        kinds["Deployment"]["apiVersion"] == "apps/v1" and kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2
    )
    assert kinds["Gateway"]["spec"]["servers"][0]["hosts"] == ["api.example.com"]


@pytest.mark.parametrize("app", [greeter_app, multi_app], ids=["greeter", "multi"])
def test_cross_checks_a_user_would_otherwise_find_in_production(app: meshrpc.App) -> None:
    docs = manifests(app.services, app.config, RoutesOptions(name=app.name, app_ref="m:a", mesh_routing=True))
    kinds = by_kind(docs)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    port = app.config.port
    # Service targetPort = container port = the app's port; named grpc with appProtocol grpc.
    (svc_port,) = kinds["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] == container["ports"][0]["containerPort"] == port
    assert svc_port["name"] == container["ports"][0]["name"] == "grpc" and svc_port["appProtocol"] == "grpc"
    assert (
        kinds["Service"]["spec"]["selector"].items()
        <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    # Probes hit the app's port on the health names it serves, and never the same name.
    readiness, liveness = container["readinessProbe"]["grpc"], container["livenessProbe"]["grpc"]
    assert readiness["port"] == liveness["port"] == port
    assert readiness.get("service", "") == ""
    assert liveness["service"] == app.config.liveness_service != readiness.get("service", "")
    # The grace period covers the app's own drain, and the env makes the app agree.
    env = {e["name"]: e["value"] for e in container["env"]}
    grace = kinds["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= app.config.drain_delay + app.config.grace
    assert float(env["MESHRPC_DRAIN_DELAY"]) + float(env["MESHRPC_GRACE"]) <= grace
    assert int(env["MESHRPC_PORT"]) == port and env["MESHRPC_LIVENESS_SERVICE"] == app.config.liveness_service
    proxy = yaml.safe_load(kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    assert proxy["holdApplicationUntilProxyStarts"] is True
    assert int(proxy["terminationDrainDuration"].rstrip("s")) >= app.config.drain_delay + app.config.grace
    # The pod's annotations are mounted where the app looks for them.
    mount = container["volumeMounts"][0]["mountPath"]
    item = kinds["Deployment"]["spec"]["template"]["spec"]["volumes"][0]["downwardAPI"]["items"][0]
    assert f"{mount}/{item['path']}" == env["MESHRPC_POD_ANNOTATIONS_PATH"] == meshrpc.Config().pod_annotations_path
    # Every registered service has a route, and nothing else does (no health, no reflection).
    uris = [r["match"][0]["uri"] for r in kinds["VirtualService"]["spec"]["http"]]
    prefixes = sorted(u["prefix"] for u in uris if "prefix" in u)
    assert prefixes == sorted(f"/{s.name}/" for s in app.services)
    exact = [u["exact"] for u in uris if "exact" in u]
    assert all(any(e.startswith(p) for p in prefixes) for e in exact)
    assert not any("grpc.health" in str(u) or "grpc.reflection" in str(u) for u in uris)
    # In-mesh routing is a VirtualService of its own (Istio rejects '*' bound to mesh).
    mesh = kinds["MeshVirtualService"]["spec"]
    assert mesh["gateways"] == ["mesh"] and mesh["hosts"] == [f"{app.name}.default.svc.cluster.local"]
    assert mesh["http"][:-1] == kinds["VirtualService"]["spec"]["http"]
    assert "match" not in mesh["http"][-1]  # in-mesh clients still reach health and reflection
    assert istio_webhook_problems(docs) == []


def test_gateway_api_flavour() -> None:
    result = routes("examples.multi.app:app", "--api", "gateway-api", "--host", "api.example.com", "--mesh-routing")
    assert result.returncode == 0, result.stderr
    assert "not part of GRPCRoute" in result.stderr  # the route options it cannot express are named
    kinds = by_kind(documents(result.stdout))
    assert list(kinds) == [
        "ServiceAccount",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Gateway",
        "GRPCRoute",
        "AuthorizationPolicy",
        "PodDisruptionBudget",
    ]
    route = kinds["GRPCRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"][0]["name"] == kinds["Gateway"]["metadata"]["name"] == "meshrpc-gateway"
    assert route["spec"]["parentRefs"][1] == {"group": "", "kind": "Service", "name": "main", "port": 8888}
    services = [
        m["method"]["service"] for r in route["spec"]["rules"] for m in r["matches"] if "method" not in m["method"]
    ]
    assert services == ["main.MainService", "helloworld.Greeter"]
    assert all(r["backendRefs"] == [{"name": "main", "port": 8888}] for r in route["spec"]["rules"])


def test_output_is_deterministic_and_matches_golden_files(tmp_path: Path) -> None:
    for name, args in {
        "greeter-istio.yaml": ("examples.greeter.app:app", "--image", "ghcr.io/acme/greeter:1.0"),
        "main-gateway-api.yaml": ("examples.multi.app:app", "--api", "gateway-api", "--image", "acme/main:1"),
    }.items():
        first, second = routes(*args), routes(*args)
        assert first.stdout == second.stdout
        golden = GOLDEN / name
        assert first.stdout == golden.read_text(), f"{name} changed: regenerate with meshrpc routes {' '.join(args)}"
        # --check, both ways
        assert routes(*args, "--check", str(golden)).returncode == 0
        edited = tmp_path / name
        edited.write_text(golden.read_text().replace("minReplicas: 2", "minReplicas: 3"))
        check = routes(*args, "--check", str(edited))
        assert check.returncode == 1
        assert "-  minReplicas: 3" in check.stdout and "+  minReplicas: 2" in check.stdout


def test_output_directory(tmp_path: Path) -> None:
    result = routes("examples.greeter.app:app", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "authorizationpolicy-greeter.yaml",
        "deployment-greeter.yaml",
        "destinationrule-greeter.yaml",
        "gateway-meshrpc-gateway.yaml",
        "horizontalpodautoscaler-greeter.yaml",
        "poddisruptionbudget-greeter.yaml",
        "service-greeter.yaml",
        "serviceaccount-greeter.yaml",
        "virtualservice-greeter.yaml",
    ]
    assert result.stdout == ""


def test_app_found_from_pyproject() -> None:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "meshrpc"), "routes"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "from app greeter (examples.greeter.app:app)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--name", "My_App"), "name 'My_App' is not a valid Kubernetes name"),
        (("--port", "70000"), "invalid setting port"),
        (("--port", "0"), "port must be 1..65535 in a manifest"),
        (("--replicas", "0"), "replicas must be at least 1"),
        (("--host", "bad host"), "host 'bad host' is not a DNS name"),
        (("--resources", "Deployment,Ingress"), "unknown resource(s) Ingress"),
        (("--namespace", "Prod"), "namespace 'Prod' is not a valid"),
    ],
)
def test_invalid_input_is_a_clear_error_with_no_yaml(args: tuple[str, ...], message: str) -> None:
    result = routes("examples.greeter.app:app", *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr


def test_app_without_services_is_an_error() -> None:
    app = meshrpc.App("empty")
    with pytest.raises(RoutesError, match="registers no services"):
        manifests(app.services, app.config, RoutesOptions(name="empty", app_ref="m:a"))


def test_grace_period_follows_the_app_settings() -> None:
    # drain delay + grace + shutdown timeout (4) + the exit margin (2), rounded up, + 1
    assert grace_period(meshrpc.Config(drain_delay=5, grace=20)) == 32
    assert grace_period(meshrpc.Config(drain_delay=10, grace=50.5)) == 68
    result = routes("examples.greeter.app:app", "--drain-delay", "10", "--grace", "50")
    kinds = by_kind(documents(result.stdout))
    assert kinds["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 67


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retry_on": ["unavailable", "deadline_exceeded"]}, "unknown retry condition(s) 'deadline_exceeded'"),
        ({"timeout": "5 seconds"}, "is not a duration"),
        ({"timeout": -1}, "a duration must be > 0"),
        ({"retries": -1}, "retries must be a whole number"),
        ({"retry_on": ["unavailable"]}, "retry_on needs retries >= 1"),
    ],
)
def test_bad_route_options_fail_when_the_app_is_loaded(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(meshrpc.AppError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:

        class Svc:
            @meshrpc.route(**kwargs)
            async def Method(self) -> None: ...

    assert "Method" in str(info.value)  # names the method


@needs_crds
def test_cel_rules_of_the_crds_are_checked() -> None:
    """The CRDs' CEL rules (x-kubernetes-validations) are enforced, not only their JSON schema."""
    from tests.schemas import cel_violations, crd_schemas

    docs = manifests(
        multi_app.services, multi_app.config, RoutesOptions(name="main", app_ref="m:a", flavour="gateway-api")
    )
    route = next(d for d in docs if d["kind"] == "GRPCRoute")
    schema = crd_schemas()[("gateway.networking.k8s.io/v1", "GRPCRoute")]
    assert cel_violations(schema, route) == []
    route["spec"]["rules"][0]["matches"][0]["method"]["service"] = "main-MainService"  # not a protobuf name
    assert any("service must only contain valid characters" in v for v in cel_violations(schema, route))
    vs = next(
        d
        for d in manifests(multi_app.services, multi_app.config, RoutesOptions(name="main", app_ref="m:a"))
        if d["kind"] == "VirtualService"
    )
    vs["spec"]["http"][0]["timeout"] = "0s"
    vs_schema = crd_schemas()[("networking.istio.io/v1", "VirtualService")]
    assert any("must be a valid duration greater than 1ms" in v for v in cel_violations(vs_schema, vs))


def test_headless_service_for_client_side_balancing() -> None:
    result = routes("examples.greeter.app:app", "--headless", "--resources", "Service,HeadlessService")
    assert result.returncode == 0, result.stderr
    plain, headless = documents(result.stdout)
    assert headless["metadata"]["name"] == "greeter-headless"
    assert headless["spec"]["clusterIP"] == "None"  # DNS answers one address per ready pod
    assert headless["spec"]["selector"] == plain["spec"]["selector"]
    assert headless["spec"]["ports"] == plain["spec"]["ports"]
    validate(headless)
