"""Validate manifests as a real API server would: official schemas, unknown fields rejected."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.helpers import ROOT

SHARED = ROOT.parent / "shared" / "schemas"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_KINDS = {"Deployment", "Service", "PodDisruptionBudget"}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are listed and unknown fields are not preserved."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every CRD."""
    files = [*(SHARED / "istio-1.30.3").glob("*.yaml"), *(SHARED / "gateway-api-v1.6.1").glob("*.yaml")]
    assert files, f"no CRDs under {SHARED}"
    schemas = {}
    for path in files:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {}).update(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
                )
                schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


def _check_metadata(document: dict[str, Any]) -> None:
    metadata = document["metadata"]
    assert set(metadata) <= {"name", "namespace", "labels", "annotations"}, metadata
    assert _NAME.match(metadata["name"]) and len(metadata["name"]) <= 63, metadata["name"]
    assert _NAME.match(metadata["namespace"]), metadata["namespace"]


def validate(document: dict[str, Any]) -> None:
    """Raise when ``document`` would be rejected by Kubernetes (strict field validation)."""
    kind = document["kind"]
    _check_metadata(document)
    if kind in CORE_KINDS:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
        return
    schema = crd_schemas().get((document["apiVersion"], kind))
    assert schema is not None, f"{document['apiVersion']} {kind} is not served by the official CRDs"
    jsonschema.validate(document, schema, cls=jsonschema.Draft7Validator)
