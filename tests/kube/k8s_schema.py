"""Strict offline validation of manifests, as the API server's strict field validation would do it.

Custom resources: the vendored CRDs' openAPIV3Schema (tests/kube/schemas, see README there) with
``additionalProperties: false`` added to every object schema that lists its properties and does
not preserve unknown fields: an unknown field is an error, as with ``kubectl apply
--validate=strict``. Core objects (the pod spec inside a template, NetworkPolicy, the deploy/
manifests): ``kubernetes-validate``'s strict schemas for KUBE_VERSION.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
KUBE_VERSION = "1.33"  # the oldest release with everything the templates use (hostUsers is beta there)
CRD_FILES = {
    ("extensions.agents.x-k8s.io", "SandboxTemplate"): "extensions.agents.x-k8s.io_sandboxtemplates.yaml",
    ("extensions.agents.x-k8s.io", "SandboxWarmPool"): "extensions.agents.x-k8s.io_sandboxwarmpools.yaml",
    ("extensions.agents.x-k8s.io", "SandboxClaim"): "extensions.agents.x-k8s.io_sandboxclaims.yaml",
    ("security-profiles-operator.x-k8s.io", "SeccompProfile"): "security-profiles-operator.x-k8s.io_seccompprofiles.yaml",
}


class Invalid(AssertionError):
    pass


def _strict(s: Any) -> Any:
    if isinstance(s, dict):
        out = {k: _strict(v) for k, v in s.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(s, list):
        return [_strict(v) for v in s]
    return s


@functools.cache
def crd_schema(group: str, kind: str, version: str) -> dict[str, Any]:
    doc = yaml.safe_load((SCHEMAS / CRD_FILES[(group, kind)]).read_text())
    for v in doc["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served"):
                raise Invalid(f"{kind} {version} is not served by the vendored CRD")
            schema = _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
            # metadata is the API server's ObjectMeta: checked separately below
            schema["properties"]["metadata"] = {"type": "object"}
            return schema
    raise Invalid(f"the vendored {kind} CRD has no version {version}")


def _core(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        raise Invalid(f"{obj.get('kind')} {path}: {e.message}") from None


def validate(obj: dict[str, Any]) -> None:
    """Raise :class:`Invalid` naming the path and the problem."""
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    key = (group, obj.get("kind", ""))
    if key not in CRD_FILES:
        _core(obj)
        return
    schema = crd_schema(group, obj["kind"], version)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise Invalid(f"{obj['kind']} {'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
    # metadata, strictly, as ObjectMeta (wrapped in a ConfigMap, the simplest core object)
    _core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})})
    if obj["kind"] == "SandboxTemplate":
        tpl = obj["spec"]["podTemplate"]
        # the pod spec inside the template, against the core Pod schema as well
        _core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **tpl.get("metadata", {})},
               "spec": tpl["spec"]})
        np = obj["spec"].get("networkPolicy")
        if np is not None:
            _core({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
                   "spec": {"podSelector": {}, **np}})
