"""Running ``meshrpc routes`` and reading what it wrote."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from tests.helpers import meshrpc as meshrpc_cli


def routes(*args: str) -> subprocess.CompletedProcess[str]:
    return meshrpc_cli("routes", *args)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    def kind(d: dict[str, Any]) -> str:
        if d["kind"] == "Service" and d["metadata"]["name"].endswith("-headless"):
            return "HeadlessService"
        if d["kind"] == "VirtualService" and d["metadata"]["name"].endswith("-mesh"):
            return "MeshVirtualService"
        if d["kind"] == "AuthorizationPolicy" and d["metadata"]["name"].endswith("-waypoint"):
            return "WaypointPolicy"
        return str(d["kind"])

    return {kind(d): d for d in docs}


def generate(*args: str) -> dict[str, dict[str, Any]]:
    """The documents ``meshrpc routes ARGS`` writes, by kind; it must succeed."""
    result = routes(*args)
    assert result.returncode == 0, result.stderr
    return by_kind(documents(result.stdout))


def pod_labels(kinds: dict[str, dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    return labels


def container(kinds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(only)
