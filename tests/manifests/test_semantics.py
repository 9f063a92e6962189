"""What the manifests mean on a real cluster, read as a platform team reads a pull request.

Schema validation says a field is well formed; these tests check what Istio, Envoy and
Kubernetes do with it, each rule quoted from their documentation.  Every scenario is
generated the way a user would: the greeter on defaults, production flags, the Gateway
API flavour, and the seed's two-app set-up.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib

from tests.helpers import ROOT
from tests.manifests.helpers import by_kind, container, documents, generate, routes
from tests.schemas import validate

GREETER = "examples.greeter.app:app"
MAIN = "tests.apps.main_server:app"
READS = "tests.apps.reads:app"
PRODUCTION = (
    "--namespace", "shop", "--max-replicas", "6", "--allow-from", "shop/checkout", "--mtls", "strict",
    "--env", "REGION=eu-west-1", "--image", "acme/greeter:1.4.2",
)  # fmt: skip
SCENARIOS = {
    "greeter": (GREETER,),
    "production": (GREETER, *PRODUCTION),
    "gateway-api": (GREETER, "--api", "gateway-api"),
    "seed": (MAIN, "--namespace", "shop", "--host", "api.example.com", "--gateway-port", "8888"),
}

# -- 1. ambient: what a receiving ztunnel can enforce --------------------------------------
# Istio, "Use Layer 4 security policy": ztunnel enforces source principals, namespaces and
# ipBlocks, and operation ports; "If a policy with rules matching L7 attributes ... is
# targeted such that it will be enforced by a receiving ztunnel, it will fail safe by
# becoming a DENY policy."
L4_SOURCE = {"principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks"}
L4_OPERATION = {"ports", "notPorts"}


def l7_fields(policy: dict[str, Any]) -> set[str]:
    found = set()
    for rule in policy["spec"].get("rules", []):
        for source in rule.get("from", []):
            found |= set(source["source"]) - L4_SOURCE
        for operation in rule.get("to", []):
            found |= set(operation["operation"]) - L4_OPERATION
        if rule.get("when"):
            found.add("when")
    return found


def ztunnel_verdict(policy: dict[str, Any], source: str, port: int) -> bool:
    """Whether a receiving ztunnel lets a call from ``source`` (a principal) to ``port`` through."""
    if l7_fields(policy):
        return False  # the whole policy becomes DENY
    namespace = source.split("/ns/")[1].split("/")[0]
    for rule in policy["spec"]["rules"]:
        sources = [f["source"] for f in rule.get("from", [])]
        ok_from = not sources or any(
            source in s.get("principals", []) or namespace in s.get("namespaces", []) for s in sources
        )
        ports = [p for t in rule.get("to", []) for p in t["operation"].get("ports", [])]
        if ok_from and (not ports or str(port) in ports):
            return True
    return False


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_pods_policy_is_l4_so_ambient_lets_the_gateway_in(scenario: str) -> None:
    kinds = generate(*SCENARIOS[scenario])
    policy = kinds["AuthorizationPolicy"]
    assert "selector" in policy["spec"]
    assert l7_fields(policy) == set()
    port = container(kinds)["ports"][0]["containerPort"]
    gateway = policy["spec"]["rules"][0]["from"][0]["source"]["principals"][0]
    assert ztunnel_verdict(policy, gateway, port)
    assert not ztunnel_verdict(policy, "cluster.local/ns/elsewhere/sa/intruder", port)
    if scenario == "production":
        assert ztunnel_verdict(policy, "cluster.local/ns/shop/sa/checkout", port)


def test_paths_go_where_they_are_enforced() -> None:
    # Declared sidecar-only: the sidecar enforces L7 on the pods themselves.
    sidecar = generate(GREETER, "--data-plane", "sidecar")["AuthorizationPolicy"]
    assert l7_fields(sidecar) == {"paths", "methods"}
    # Ambient with a waypoint: paths on a policy attached to the Service, which the waypoint enforces.
    kinds = generate(GREETER, "--data-plane", "ambient", "--waypoint", "waypoint", "--allow-from", "shop")
    pods, waypoint = kinds["AuthorizationPolicy"], kinds["WaypointPolicy"]
    validate(pods, waypoint)
    assert l7_fields(pods) == set()
    # The ztunnel in front of the pods sees the waypoint as the caller: it must be let in.
    assert ztunnel_verdict(pods, "cluster.local/ns/default/sa/waypoint", 50051)
    assert "selector" not in waypoint["spec"]
    assert waypoint["spec"]["targetRefs"] == [
        {"kind": "Service", "group": "", "name": kinds["Service"]["metadata"]["name"]}
    ]
    paths = {p for r in waypoint["spec"]["rules"] for t in r["to"] for p in t["operation"]["paths"]}
    assert paths == {"/helloworld.Greeter/*"}  # no health, no reflection
    assert routes(GREETER, "--data-plane", "sidecar", "--waypoint", "w").returncode != 0


# -- 2. the ingress install: selector and principal from one option ------------------------
# What each install gives the gateway's pods (Istio's install docs): istioctl's default
# profile runs istio-ingressgateway in istio-system as istio-ingressgateway-service-account,
# labelled istio=ingressgateway; `helm install istio-ingress istio/gateway -n istio-ingress`
# labels the pods istio=ingress and runs them as istio-ingress.
INSTALLS = {
    "istioctl": ({"istio": "ingressgateway", "app": "istio-ingressgateway"}, "istio-system", "istio-ingressgateway-service-account"),
    "helm": ({"istio": "ingress", "app": "istio-ingress"}, "istio-ingress", "istio-ingress"),
}  # fmt: skip


@pytest.mark.parametrize("install", sorted(INSTALLS))
def test_the_gateway_selects_and_the_policy_admits_the_installed_gateway(install: str) -> None:
    labels, namespace, account = INSTALLS[install]
    kinds = generate(GREETER, "--ingress", install)
    selector = kinds["Gateway"]["spec"]["selector"]
    assert selector.items() <= labels.items()  # it selects the install's pods
    principal = f"cluster.local/ns/{namespace}/sa/{account}"
    assert ztunnel_verdict(kinds["AuthorizationPolicy"], principal, 50051)
    other = INSTALLS["helm" if install == "istioctl" else "istioctl"]
    assert not selector.items() <= other[0].items()


def test_stderr_says_which_install_the_defaults_assume() -> None:
    result = routes(GREETER)
    assert "istio=ingressgateway" in result.stderr and "istioctl" in result.stderr and "--ingress helm" in result.stderr


# -- 3. two apps on their defaults share one Gateway -------------------------------------


@pytest.mark.parametrize("api", ["istio", "gateway-api"])
def test_two_apps_on_defaults_write_one_gateway_not_two(api: str) -> None:
    first = generate(GREETER, "--api", api)
    second = generate(MAIN, "--api", api)
    # Same kind, namespace and name: `kubectl apply` of both makes one Gateway (one
    # listener, one load balancer), and the two documents are identical, so neither apply
    # changes what the other wrote.
    assert first["Gateway"] == second["Gateway"]
    route_kind = "VirtualService" if api == "istio" else "GRPCRoute"
    name = first["Gateway"]["metadata"]["name"]
    for kinds in (first, second):
        if api == "istio":
            assert kinds[route_kind]["spec"]["gateways"] == [name]
        else:
            assert kinds[route_kind]["spec"]["parentRefs"][0]["name"] == name
    assert first[route_kind]["metadata"]["name"] != second[route_kind]["metadata"]["name"]


# -- 4. outlier detection that takes effect -----------------------------------------------


def test_outlier_detection_ejects_on_gateway_errors_only() -> None:
    rule = generate(GREETER)["DestinationRule"]["spec"]["trafficPolicy"]["outlierDetection"]
    # Istio's DestinationRule reference: consecutive5xxErrors defaults to 5, 0 disables it, and
    # "if the value of consecutive_gateway_errors is greater than or equal to the value of
    # consecutive_5xx_errors, consecutive_gateway_errors will have no effect".
    five_xx = rule.get("consecutive5xxErrors", 5)
    gateway = rule.get("consecutiveGatewayErrors", 0)
    assert gateway > 0 and (five_xx == 0 or gateway < five_xx)
    assert five_xx == 0  # an app's INTERNAL answers (HTTP 500 to Envoy) eject nobody


# -- 5. explicit retries, from the proto's idempotency_level -------------------------------
# Istio retries twice on "connect-failure,refused-stream,unavailable,cancelled,
# retriable-status-codes" where a route says nothing; after the request reached the app,
# only a method safe to repeat may be retried.
AFTER_THE_APP = {"unavailable", "cancelled", "reset", "5xx", "gateway-error", "internal", "retriable-status-codes"}


def route_for(http: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The route Istio picks for ``path``: the first whose match holds."""
    for route in http:
        uri = route["match"][0]["uri"]
        if uri.get("exact") == path or ("prefix" in uri and path.startswith(uri["prefix"])):
            return route
    raise AssertionError(f"no route for {path}")


def retried_on(route: dict[str, Any]) -> set[str]:
    retries = route["retries"]  # every route says it: Istio's default never decides
    return set(retries.get("retryOn", "").split(",")) if retries["attempts"] else set()


def test_only_methods_declared_idempotent_are_retried_after_reaching_the_app() -> None:
    http = generate(READS)["VirtualService"]["spec"]["http"]
    assert all("retries" in route for route in http)
    get_item = retried_on(route_for(http, "/main.MainService/GetItem"))  # NO_SIDE_EFFECTS in the proto
    list_items = retried_on(route_for(http, "/main.MainService/ListItems"))  # not declared
    assert "unavailable" in get_item and {"connect-failure", "refused-stream"} <= get_item
    assert list_items and not list_items & AFTER_THE_APP
    greeter = generate(GREETER)["VirtualService"]["spec"]["http"]
    assert not retried_on(route_for(greeter, "/helloworld.Greeter/SayHello")) & AFTER_THE_APP


def test_route_options_override_and_the_mesh_routes_say_it_too() -> None:
    kinds = generate("examples.multi.app:app", "--mesh-routing")
    for vs in (kinds["VirtualService"], kinds["MeshVirtualService"]):
        http = vs["spec"]["http"]
        assert all("retries" in route for route in http)
        assert retried_on(route_for(http, "/main.MainService/GetItem")) == {"unavailable", "reset"}  # the code's
        assert not retried_on(route_for(http, "/main.MainService/ListItems")) & AFTER_THE_APP


# -- 7. readiness that survives a stall ---------------------------------------------------


def test_readiness_does_not_flap_on_one_slow_probe() -> None:
    probe = container(generate(GREETER))["readinessProbe"]
    # A pod leaves the endpoints after failureThreshold consecutive failures, one per period.
    assert probe["failureThreshold"] >= 3 and probe["failureThreshold"] * probe["periodSeconds"] >= 10
    assert probe.get("timeoutSeconds", 1) >= 2


# -- 8. what the Deployment turns on, the default install serves ---------------------------


def test_the_base_install_serves_the_metrics_the_manifest_turns_on() -> None:
    env = {e["name"]: e.get("value") for e in container(generate(GREETER))["env"]}
    assert "MESHRPC_METRICS_PORT" in env
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=;\[ ]", d)[0].lower().replace("_", "-") for d in project["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    source = (ROOT / "src" / "meshrpc" / "_metrics.py").read_text()
    imported = set(re.findall(r"^\s*from (\w+)", source, re.M)) - {"__future__"}
    imported |= set(re.findall(r"^\s*import (\w+)", source, re.M))
    for module in sorted(imported):
        if module in ("asyncio", "concurrent", "logging", "collections", "typing"):
            continue
        for distribution in providers.get(module, []):
            if module == "opentelemetry":
                needed = {"opentelemetry-sdk", "opentelemetry-exporter-prometheus"}
                assert needed <= base, f"{needed - base} missing from the base install"
            else:
                name = distribution.lower().replace("_", "-")
                assert name in base, f"{module} ({distribution}) is not in the base install"


# -- 9. compatibility ----------------------------------------------------------------------


def test_grpcroute_fits_gateway_api_v1_1() -> None:
    route = generate("examples.multi.app:app", "--api", "gateway-api")["GRPCRoute"]
    # rules[].name entered GRPCRoute's standard channel in Gateway API v1.4; the v1.1-v1.3
    # CRDs reject it, and v1.1 is the oldest with GRPCRoute v1.
    assert all(set(rule) <= {"matches", "backendRefs"} for rule in route["spec"]["rules"])
    validate(route)


def test_routes_md_states_what_the_yaml_assumes() -> None:
    text = (ROOT / "docs" / "routes.md").read_text()
    section = text.split("## What this YAML assumes", 1)[1].split("\n## ", 1)[0]
    needed_all = (
        "Istio 1.22",
        "Gateway API v1.1",
        "--ingress",
        "--data-plane",
        "--waypoint",
        "istioctl",
        "helm install",
    )
    for needed in needed_all:
        assert needed in section, needed


# -- 10. what a reviewer also expects -------------------------------------------------------


def test_the_pod_spreads_versions_and_drains_well() -> None:
    kinds = generate(GREETER, *PRODUCTION, "--memory-request", "256Mi", "--memory-limit", "1Gi")
    deployment = kinds["Deployment"]
    validate(deployment, kinds["PodDisruptionBudget"])
    pod = deployment["spec"]["template"]
    (zone,) = pod["spec"]["topologySpreadConstraints"]
    assert zone["topologyKey"] == "topology.kubernetes.io/zone" and zone["whenUnsatisfiable"] == "ScheduleAnyway"
    assert zone["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["version"] == pod["metadata"]["labels"]["app.kubernetes.io/version"] == "1.4.2"
    assert "version" not in deployment["spec"]["selector"]["matchLabels"]  # a new version is not a new selector
    assert kinds["PodDisruptionBudget"]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    app = container(kinds)
    assert app["resources"]["requests"]["memory"] == "256Mi" and app["resources"]["limits"]["memory"] == "1Gi"
    # A read-only root, and a writable /tmp beside it.
    assert app["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = next(m for m in app["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume and not tmp.get("readOnly")
    annotations = pod["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/rewriteAppHTTPProbers"] == "true"
    import yaml

    proxy = yaml.safe_load(annotations["proxy.istio.io/config"])
    assert proxy["proxyMetadata"]["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] == "true"
    # Not before the drain delay (5 s) is over: the app takes new calls until then.
    assert int(proxy["proxyMetadata"]["MINIMUM_DRAIN_DURATION"].rstrip("s")) > 5
    assert routes(GREETER, "--memory-request", "1Gi", "--memory-limit", "512Mi").returncode != 0


def test_a_plaintext_gateway_for_a_real_host_is_noted() -> None:
    assert "plaintext" in routes(GREETER, "--host", "api.example.com").stderr
    assert "plaintext" not in routes(GREETER, "--host", "api.example.com", "--tls-secret", "api-cert").stderr
    assert "plaintext" not in routes(GREETER).stderr  # host '*': a test or internal gateway


@pytest.mark.parametrize("plane", ["any", "sidecar", "ambient"])
def test_network_policy_admits_the_gateway_callers_hbone_and_scrapers(plane: str) -> None:
    kinds = generate(
        GREETER, "--network-policy", "--allow-from", "shop/checkout", "--data-plane", plane, "--ingress", "helm"
    )
    policy = kinds["NetworkPolicy"]
    validate(policy)
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    calls, scrape = policy["spec"]["ingress"]
    namespaces = {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in calls["from"]}
    assert namespaces == {"istio-ingress", "shop"}
    ports = {p["port"] for p in calls["ports"]}
    # Ambient: ztunnel delivers on HBONE, 15008 (Istio's ambient docs ask NetworkPolicy to allow it).
    assert ports == ({50051} if plane == "sidecar" else {50051, 15008})
    assert 9464 in {p["port"] for p in scrape["ports"]} and "from" not in scrape


def test_pod_monitor_scrapes_the_metrics_port() -> None:
    kinds = generate(GREETER, "--pod-monitor")
    monitor = kinds["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(kinds)["ports"]} and endpoint["path"] == "/metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    assert "PodMonitor" not in generate(GREETER, "--pod-monitor", "--no-metrics")


# -- 11. the command's own bugs -------------------------------------------------------------


def test_check_reads_an_output_directory_and_its_files(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    assert routes(GREETER, "--image", "acme/g:1", "--output", str(out)).returncode == 0
    assert routes("--check", str(out)).returncode == 0  # alone: the options the files record
    one = out / "deployment-greeter.yaml"
    assert routes(GREETER, "--image", "acme/g:1", "--check", str(one)).returncode == 0
    assert routes("--check", str(one)).returncode == 0
    one.write_text(one.read_text().replace("acme/g:1", "acme/g:2"))
    stale = routes("--check", str(out))
    assert stale.returncode == 1 and "deployment-greeter.yaml differ" in stale.stderr
    (out / "poddisruptionbudget-greeter.yaml").unlink()
    assert "poddisruptionbudget-greeter.yaml are missing" in routes("--check", str(out)).stderr


def test_resources_virtualservice_keeps_the_mesh_one() -> None:
    docs = documents(routes(GREETER, "--mesh-routing", "--resources", "VirtualService").stdout)
    assert sorted(d["metadata"]["name"] for d in docs) == ["greeter", "greeter-mesh"]


def test_no_autoscaling_contradicting_resources_is_an_error() -> None:
    result = routes(GREETER, "--no-autoscaling", "--resources", "Deployment,HorizontalPodAutoscaler")
    assert result.returncode != 0 and result.stdout == ""
    assert "--no-autoscaling" in result.stderr and "HorizontalPodAutoscaler" in result.stderr


def test_every_scenario_validates_strictly() -> None:
    for args in SCENARIOS.values():
        kinds = by_kind(documents(routes(*args).stdout))
        validate(*kinds.values())
