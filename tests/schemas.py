"""Validate manifests as a real API server would.

Two levels, so that a clone with nothing beside it still checks every document:

- always: Kubernetes core kinds with kubernetes-validate (strict), Istio and Gateway
  API kinds with @kubernetes-models' validators (generated from the official CRDs,
  installed into tests/node by README's test command);
- where the official CRDs are found (``../shared/schemas`` beside the clone, or the
  folder named by ``CRD_SCHEMAS_DIR``): their own schemas with unknown fields
  rejected, and their CEL rules.  ``CRD_SCHEMAS_DIR=`` (empty) hides them.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

from tests.helpers import NODE_CLIENTS, ROOT

CRDS_VARIABLE = "CRD_SCHEMAS_DIR"
CRD_SETS = ("istio-1.30.3", "gateway-api-v1.6.1")


def crd_dir() -> Path | None:
    """Where the official CRDs are, or None when this clone has none beside it."""
    given = os.environ.get(CRDS_VARIABLE)
    folder = Path(given) if given else ROOT.parent / "shared" / "schemas"
    if given == "" or not all((folder / name).is_dir() for name in CRD_SETS):
        return None
    return folder


NO_CRDS_REASON = (
    f"the official CRDs ({', '.join(CRD_SETS)}) are not beside this clone: put them in ../shared/schemas "
    f"or name their folder in {CRDS_VARIABLE} to run the strict checks (unknown fields, CEL rules)"
)
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_KINDS = {
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "ServiceAccount",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
}
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
    folder = crd_dir()
    assert folder is not None, NO_CRDS_REASON
    files = [path for name in CRD_SETS for path in (folder / name).glob("*.yaml")]
    assert files, f"no CRDs under {folder}"
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


# Kubernetes escapes property names that CEL cannot use as identifiers.
_CEL_RESERVED = set(
    [
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ]
)
_CEL = celpy.Environment()


def _cel_name(key: str) -> str:
    if key in _CEL_RESERVED:
        return f"__{key}__"
    return (
        key.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__").replace("/", "__slash__")
    )


def _cel_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {_cel_name(k): _cel_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cel_value(v) for v in value]
    return value


@functools.cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server does before validating."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            result[key] = defaulted(sub, item) if sub else item
        for key, sub in properties.items():
            if key not in result and "default" in sub:
                result[key] = sub["default"]
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [defaulted(schema["items"], item) for item in value]
    return value


def cel_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The CRD's x-kubernetes-validations rules (CEL) that ``value`` breaks, as an API server checks them."""
    if not path:
        value = defaulted(schema, value)
    found = []
    for validation in schema.get("x-kubernetes-validations", ()):
        rule = validation["rule"]
        if "oldSelf" in rule:  # transition rules apply to updates only
            continue
        result = _program(rule).evaluate({"self": celpy.json_to_cel(_cel_value(value))})
        if result is not True and str(result) != "True":
            found.append(f"{path or '.'}: {validation.get('message') or rule}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub:
                found.extend(cel_violations(sub, item, f"{path}.{key}"))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found.extend(cel_violations(schema["items"], item, f"{path}[{index}]"))
    return found


def model_errors(documents: list[dict[str, Any]]) -> list[str | None]:
    """What @kubernetes-models' CRD-generated validators say of each document (None: valid)."""
    script = NODE_CLIENTS / "validate.mjs"
    assert (NODE_CLIENTS / "node_modules" / "@kubernetes-models").is_dir(), (
        "the CRD validators are missing: run 'npm install --prefix tests/node'"
    )
    result = subprocess.run(
        ["node", str(script)], input=json.dumps(documents), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    errors: list[str | None] = json.loads(result.stdout)
    return errors


class ManifestError(AssertionError):
    """A document an API server would reject."""


def validate(*documents: dict[str, Any]) -> None:
    """Raise when any of ``documents`` would be rejected by Kubernetes (strict field validation)."""
    custom = []
    for document in documents:
        _check_metadata(document)
        if document["kind"] in CORE_KINDS:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(document, version, strict=True)
        else:
            custom.append(document)
    if not custom:
        return
    problems = [error for error in model_errors(custom) if error]
    if problems:
        raise ManifestError("; ".join(problems))
    if crd_dir() is None:
        return
    for document in custom:
        _validate_with_crds(document)


def _validate_with_crds(document: dict[str, Any]) -> None:
    kind = document["kind"]
    schema = crd_schemas().get((document["apiVersion"], kind))
    assert schema is not None, f"{document['apiVersion']} {kind} is not served by the official CRDs"
    jsonschema.validate(document, schema, cls=jsonschema.Draft7Validator)
    violations = cel_violations(schema, document)
    assert not violations, f"{kind} {document['metadata']['name']} breaks CEL rules: {violations}"
