"""Dataset upload/registration and artifact download against the real S3 server and Postgres."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from shared.config import get_settings
from shared.db import session_scope
from shared.models import Artifact, Dataset
from shared.storage import ObjectStore

pytestmark = pytest.mark.integration


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_tar(entries: dict[str, bytes], *, gz: bool = True, extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return buf.getvalue()


def imagefolder(classes=("cat", "dog"), per_class=6, prefix="") -> dict[str, bytes]:
    return {f"{prefix}{c}/{i}.png": png_bytes(hash((c, i)) % 1000) for c in classes for i in range(per_class)}


def cas_keys() -> set[str]:
    return {k for k, _, _ in ObjectStore().list_keys("cas/")}


def dataset_rows() -> tuple[int, int]:
    with session_scope() as s:
        return (s.scalar(select(func.count()).select_from(Dataset)),
                s.scalar(select(func.count()).select_from(Artifact)))


def upload(client, auth, name: str, data: bytes, filename: str = "data.tar.gz"):
    return client.post("/v1/datasets", data={"name": name}, files={"file": (filename, data)}, headers=auth)


def test_upload_validates_stores_once_and_downloads(client, auth):
    data = make_tar(imagefolder(per_class=10))
    r = upload(client, auth, "pets", data)
    assert r.status_code == 201, r.json()
    ds = r.json()
    assert ds["version"] == 1 and ds["source"] == "archive"
    assert ds["stats"]["images"] == 20 and ds["stats"]["classes"] == ["cat", "dog"]
    assert ds["stats"]["train"] == 16 and ds["stats"]["test"] == 4  # 20% of each class held out
    digest = hashlib.sha256(data).hexdigest()
    assert f"cas/sha256/{digest}" in cas_keys()
    again = upload(client, auth, "pets", data)  # same content: no new version, no new object
    assert again.status_code == 200 and again.json()["id"] == ds["id"]
    art = client.get(f"/v1/artifacts/{ds['artifact_id']}", headers=auth).json()
    assert art["kind"] == "dataset" and art["sha256"] == digest and art["size_bytes"] == len(data)
    assert hashlib.sha256(httpx.get(art["download_url"]).content).hexdigest() == digest
    v2 = upload(client, auth, "pets", make_tar(imagefolder(per_class=11)))
    assert v2.status_code == 201 and v2.json()["version"] == 2
    assert client.get("/v1/datasets/pets", headers=auth).json()["version"] == 2
    assert client.get("/v1/datasets/pets@1", headers=auth).json()["id"] == ds["id"]
    job = client.post("/v1/jobs", json={"kind": "ssl-train", "dataset": "pets@1", "batch_size": 8, "bank_size": 16},
                      headers=auth)
    assert job.status_code == 201, job.json()
    assert job.json()["inputs"]["dataset"]["dataset_id"] == ds["id"]


def _symlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("cat/link.png")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    tar.addfile(info)


@pytest.mark.parametrize("filename,payload,needle", [
    ("evil.tar.gz", lambda: make_tar({**imagefolder(), "../evil/x.png": png_bytes(1)}), ".."),
    ("abs.tar", lambda: make_tar({**imagefolder(), "/etc/x.png": png_bytes(2)}, gz=False), "absolute"),
    ("link.tar.gz", lambda: make_tar(imagefolder(), extra=_symlink), "link"),
    ("junk.tar.gz", lambda: make_tar({**imagefolder(), "cat/notes.png": b"this is not an image"}), "cat/notes.png"),
    ("flat.tar.gz", lambda: make_tar({"a.png": png_bytes(3), "b.png": png_bytes(4)}), "class"),
    ("data.rar", lambda: b"Rar!\x1a\x07\x00", "unsupported archive"),
    ("broken.zip", lambda: b"PK\x03\x04 definitely not a zip", "zip"),
])
def test_bad_archives_are_rejected_and_leave_nothing(client, auth, filename, payload, needle):
    before_keys, before_rows = cas_keys(), dataset_rows()
    r = upload(client, auth, "bad", payload(), filename)
    assert r.status_code == 422, r.json()
    (d,) = r.json()["detail"]
    assert d["loc"] == ["body", "file"] and needle in d["msg"], d
    assert cas_keys() == before_keys and dataset_rows() == before_rows


def test_zip_uploads_and_limits(client, auth, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in imagefolder(prefix="mydata/train/").items():
            z.writestr(name, data)
        for name, data in imagefolder(per_class=2, prefix="mydata/test/").items():
            z.writestr(name, data)
    r = upload(client, auth, "zipped", buf.getvalue(), "zipped.zip")
    assert r.status_code == 201, r.json()
    assert r.json()["stats"]["train"] == 12 and r.json()["stats"]["test"] == 4
    before_keys, before_rows = cas_keys(), dataset_rows()
    monkeypatch.setattr(get_settings(), "MAX_ARCHIVE_FILES", 5)
    r = upload(client, auth, "toomany", make_tar(imagefolder(per_class=4)))
    assert r.status_code == 422 and "files" in r.json()["detail"][0]["msg"]
    monkeypatch.setattr(get_settings(), "MAX_UPLOAD_BYTES", 1000)
    r = upload(client, auth, "toobig", make_tar(imagefolder(per_class=4)))
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "file"]
    assert cas_keys() == before_keys and dataset_rows() == before_rows


def test_missing_fields_and_wrong_content_type(client, auth):
    r = client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a", b"b")}, headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    r = client.post("/v1/datasets", data={"name": "bad name!"}, files={"file": ("a.tar", b"x")}, headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    r = client.post("/v1/datasets", content=b"hello", headers={**auth, "content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "content-type"]
    r = client.post("/v1/datasets", json={"name": "x"}, headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "uri"]


def test_register_prefix(client, auth):
    store = ObjectStore()
    for name, data in imagefolder(classes=("a", "b", "c"), per_class=5).items():
        store.client.put_object(store.bucket, f"lab/shapes3/{name}", io.BytesIO(data), len(data))
    r = client.post("/v1/datasets", json={"name": "shapes3", "uri": f"s3://{store.bucket}/lab/shapes3"}, headers=auth)
    assert r.status_code == 201, r.json()
    assert r.json()["source"] == "prefix" and r.json()["stats"]["num_classes"] == 3
    assert r.json()["stats"]["train"] == 12
    r = client.post("/v1/datasets", json={"name": "nothing", "uri": f"s3://{store.bucket}/lab/none/"}, headers=auth)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["body", "uri"]
    r = client.post("/v1/datasets", json={"name": "steal", "uri": f"s3://{store.bucket}/cas/sha256/"}, headers=auth)
    assert r.status_code == 422
    r = client.post("/v1/datasets", json={"name": "x", "uri": "http://example.com/data"}, headers=auth)
    assert r.status_code == 422


def test_datasets_and_artifacts_are_project_scoped(client, auth):
    from tests.conftest import new_project_key

    ds = upload(client, auth, "private", make_tar(imagefolder())).json()
    _, token = new_project_key("other")
    other = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/datasets", headers=other).json() == []
    assert client.get(f"/v1/datasets/{ds['id']}", headers=other).status_code == 404
    assert client.get(f"/v1/artifacts/{ds['artifact_id']}", headers=other).status_code == 404
    r = client.post("/v1/jobs", json={"kind": "ssl-train", "dataset": ds["id"], "batch_size": 8, "bank_size": 8},
                    headers=other)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["body", "dataset"]
