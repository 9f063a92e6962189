"""The seed's set-up: main-server on 8888 behind a gateway, and a second app on the same gateway and domain."""

from __future__ import annotations

from typing import Any

from tests.manifests.helpers import container, documents, routes
from tests.schemas import validate

DOMAIN = "api.example.com"


def test_two_apps_share_one_gateway_and_domain() -> None:
    main = routes(
        "tests.apps.main_server:app", "--namespace", "shop", "--replicas", "2",
        "--host", DOMAIN, "--gateway-name", "shop-gateway", "--gateway-port", "8888",
        "--image", "acme/main-server:1",
        "--env", "EXTERNAL_SERVER_HOST=partner.example.net", "--env", "EXTERNAL_SERVER_PORT=443",
    )  # fmt: skip
    assert main.returncode == 0, main.stderr
    second = routes(
        "examples.greeter.app:app", "--namespace", "shop", "--host", DOMAIN,
        "--no-gateway", "--gateway-name", "shop-gateway", "--image", "acme/greeter:1",
        "--allow-from", "shop/main-server",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    first_docs, second_docs = documents(main.stdout), documents(second.stdout)
    validate(*first_docs, *second_docs)
    a: dict[str, Any] = {d["kind"]: d for d in first_docs}
    b: dict[str, Any] = {d["kind"]: d for d in second_docs}

    assert "Gateway" in a and "Gateway" not in b  # one gateway, written once
    gateway = a["Gateway"]
    assert gateway["metadata"]["name"] == "shop-gateway"
    assert gateway["spec"]["servers"][0]["port"]["number"] == 8888
    assert gateway["spec"]["servers"][0]["hosts"] == [DOMAIN]
    for vs in (a["VirtualService"], b["VirtualService"]):
        assert vs["spec"]["gateways"] == ["shop-gateway"] and vs["spec"]["hosts"] == [DOMAIN]
    # One domain, two apps: each routes only its own services, so the prefixes never overlap.
    prefixes_a = {r["match"][0]["uri"].get("prefix") for r in a["VirtualService"]["spec"]["http"]} - {None}
    prefixes_b = {r["match"][0]["uri"].get("prefix") for r in b["VirtualService"]["spec"]["http"]} - {None}
    assert prefixes_a and prefixes_b and not prefixes_a & prefixes_b
    assert prefixes_a == {"/main.MainService/"} and prefixes_b == {"/helloworld.Greeter/"}
    destinations_b = {r["route"][0]["destination"]["host"] for r in b["VirtualService"]["spec"]["http"]}
    assert destinations_b == {f"{b['Service']['metadata']['name']}.shop.svc.cluster.local"}

    assert (
        a["Deployment"]["metadata"]["name"] == "main-server"
        and a["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2
    )
    assert container(a)["ports"][0]["containerPort"] == 8888
    env = {e["name"]: e["value"] for e in container(a)["env"]}
    assert env["EXTERNAL_SERVER_HOST"] == "partner.example.net" and env["EXTERNAL_SERVER_PORT"] == "443"
    # Each app's policy selects its own pods only, and the second lets main-server call it.
    selector_a = a["AuthorizationPolicy"]["spec"]["selector"]["matchLabels"]
    selector_b = b["AuthorizationPolicy"]["spec"]["selector"]["matchLabels"]
    assert selector_a != selector_b
    assert selector_a.items() <= a["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert not selector_a.items() <= b["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    principals = b["AuthorizationPolicy"]["spec"]["rules"][1]["from"][0]["source"]["principals"]
    assert (
        principals
        == ["cluster.local/ns/shop/sa/main-server"]
        == [f"cluster.local/ns/shop/sa/{a['ServiceAccount']['metadata']['name']}"]
    )
