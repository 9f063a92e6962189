"""How it scales: the HorizontalPodAutoscaler, and a Deployment that leaves it the replica count."""

from __future__ import annotations

from tests.manifests.helpers import container, generate, routes
from tests.schemas import validate

APP = "examples.multi.app:app"


def test_the_autoscaler_owns_the_replica_count() -> None:
    kinds = generate(APP, "--replicas", "3", "--max-replicas", "12", "--target-cpu", "60", "--cpu-request", "250m")
    hpa, deployment = kinds["HorizontalPodAutoscaler"], kinds["Deployment"]
    validate(hpa, deployment)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (metric,) = hpa["spec"]["metrics"]
    # The app container's CPU, not the pod's (which averages in an idle sidecar).
    assert metric["type"] == "ContainerResource"
    assert metric["containerResource"] == {
        "name": "cpu",
        "container": container(kinds)["name"],
        "target": {"type": "Utilization", "averageUtilization": 60},
    }
    # `kubectl apply` must not reset what the autoscaler scaled to.
    assert "replicas" not in deployment["spec"]
    # Utilisation is a share of the request: there must be one.
    assert container(kinds)["resources"]["requests"]["cpu"] == "250m"


def test_scaling_down_waits_for_the_drain() -> None:
    kinds = generate(APP, "--drain-delay", "10", "--grace", "50")
    grace = kinds["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    down = kinds["HorizontalPodAutoscaler"]["spec"]["behavior"]["scaleDown"]
    assert grace == 67  # 10 + 50 + 4 (shutdown timeout) + 2 (exit margin) + 1
    assert down["stabilizationWindowSeconds"] >= max(300, grace)
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": grace}]  # one pod per drain


def test_no_autoscaling_keeps_fixed_replicas() -> None:
    kinds = generate(APP, "--no-autoscaling", "--replicas", "4")
    assert "HorizontalPodAutoscaler" not in kinds
    assert kinds["Deployment"]["spec"]["replicas"] == 4
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1  # the PDB stays as it was


def test_bad_scaling_options_are_clear_errors() -> None:
    for args, message in (
        (("--replicas", "5", "--max-replicas", "3"), "max replicas (3) must be at least the replicas (5)"),
        (("--target-cpu", "150"), "target CPU must be 1..100"),
        (("--cpu-request", "lots"), "CPU request 'lots' is not a CPU quantity"),
    ):
        result = routes(APP, *args)
        assert result.returncode == 1 and message in result.stderr, result.stderr
