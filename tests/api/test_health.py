from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_healthz_is_up_without_dependencies(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_checks_every_dependency(client, mlflow_ready):
    r = client.get("/readyz")
    assert r.status_code == 200, r.json()
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "object_store": "ok", "mlflow": "ok"}


def test_readyz_names_the_failing_dependency(client, monkeypatch):
    from shared.config import get_settings

    monkeypatch.setattr(get_settings(), "S3_BUCKET", "no-such-bucket-here")
    r = client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["object_store"].startswith("error:") and "no-such-bucket-here" in checks["object_store"]
    assert checks["database"] == "ok"


def test_openapi_documents_every_endpoint_with_examples(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ["/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
                 "/v1/datasets", "/v1/artifacts/{artifact_id}", "/v1/experiments", "/healthz", "/readyz"]:
        assert path in paths, path
    submit = paths["/v1/jobs"]["post"]
    assert submit["operationId"] == "jobs-submit_job"
    assert "examples" in submit["requestBody"]["content"]["application/json"]
    assert "multipart/form-data" in paths["/v1/datasets"]["post"]["requestBody"]["content"]
