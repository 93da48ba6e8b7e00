"""Every overlay renders with kustomize and every object is valid against the Kubernetes API schemas."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.deploy.conftest import OVERLAYS, find

# The oldest Kubernetes the README supports and the newest schema set kubernetes-validate 1.37.0 ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# Custom resources: kubernetes-validate has only the built-in API. test_k8s_rules.py checks these structurally.
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
             ("monitoring.coreos.com/v1", "PodMonitor")}  # the router's: tests/deploy/test_router_k8s.py


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_platform(rendered, overlay):
    docs = rendered[overlay]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "crucible-api") in names and ("Job", "crucible-migrate") in names
    assert all(d["metadata"].get("namespace") == "crucible" for d in docs if d["kind"] != "Namespace"), \
        "every namespaced object must land in namespace crucible"
    if overlay != "base":
        for infra in ("postgres", "redis", "minio"):
            assert ("StatefulSet", infra) in names
        assert ("Deployment", "mlflow") in names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_api_schema(rendered, overlay, version):
    problems = []
    for doc in rendered[overlay]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: {doc['apiVersion']} is not in Kubernetes "
                            f"{version} (a CRD? add it to CRD_KINDS and check it in test_k8s_rules.py)")
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{doc['kind']} {doc['metadata']['name']} at {where}: {e.message}")
    assert not problems, "\n".join(problems)


def test_schema_validation_is_not_vacuous(rendered):
    """A wrong type and an unknown field are caught, so a green run above means something."""
    api = copy.deepcopy(find(rendered["gpu-cluster"], "Deployment", "crucible-api"))
    api["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSIONS[-1], strict=True)
    api = copy.deepcopy(find(rendered["gpu-cluster"], "Deployment", "crucible-api"))
    api["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSIONS[-1], strict=True)
