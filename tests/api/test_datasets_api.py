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


def test_missing_uri_and_malformed_uris_are_422(client, auth):
    r = client.post("/v1/datasets", json={"name": "x", "uri": "http://example.com/data"}, headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "uri"]
    r = client.post("/v1/datasets", json={"name": "x", "uri": "s3://Bad_Bucket/a/"}, headers=auth)
    assert r.status_code == 422 and "bucket" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/datasets", json={"name": "x", "uri": "s3://some-bucket/a/../../etc/"}, headers=auth)
    assert r.status_code == 422 and "climbs above" in r.json()["detail"][0]["msg"]


# --- tenant-safe prefixes -----------------------------------------------------------------------------------------
@pytest.fixture
def tenant(stack):
    from tests.conftest import new_project_key

    name, token = new_project_key("tenant")
    return name, {"Authorization": f"Bearer {token}"}


def put_tree(bucket: str, prefix: str, **kw) -> None:
    store = ObjectStore()
    store.ensure_bucket(bucket)
    for name, data in imagefolder(**kw).items():
        store.client.put_object(bucket, f"{prefix}{name}", io.BytesIO(data), len(data))


def grant(project: str, uri: str):
    from services.datasets import storage

    with session_scope() as s:
        return storage.grant(session=s, project_name=project, uri=uri)


def register(client, headers, name: str, uri: str):
    return client.post("/v1/datasets", json={"name": name, "uri": uri}, headers=headers)


def generic(r, uri: str) -> str:
    """The 404's message with the (normalised) URI cut out: it must be the same for every refusal."""
    assert r.status_code == 404, r.json()
    (d,) = r.json()["detail"]
    assert d["loc"] == ["body", "uri"] and "grant-storage" in d["msg"], d
    assert "NoSuchBucket" not in d["msg"] and "AccessDenied" not in d["msg"]
    return d["msg"].replace(uri, "<uri>")


def test_register_prefix_inside_a_grant(client, tenant):
    project, headers = tenant
    bucket = ObjectStore().bucket
    put_tree(bucket, f"lab/{project}/shapes3/", classes=("a", "b", "c"), per_class=5)
    area = f"s3://{bucket}/lab/{project}/"
    # not granted yet: the same 404 as for a location that does not exist
    assert generic(register(client, headers, "shapes3", area + "shapes3"), area + "shapes3/") == \
        generic(register(client, headers, "shapes3", f"s3://no-such-bucket-{project}/x/"),
                f"s3://no-such-bucket-{project}/x/")
    grant(project, area)
    r = register(client, headers, "shapes3", f"s3://{bucket}//lab/./{project}//shapes3/")
    assert r.status_code == 201, r.json()
    assert r.json()["source"] == "prefix" and r.json()["stats"]["num_classes"] == 3
    assert r.json()["stats"]["train"] == 12
    with session_scope() as s:
        art = s.get(Artifact, r.json()["artifact_id"])
        assert (art.bucket, art.key) == (bucket, f"lab/{project}/shapes3/")  # stored normalised
    generic(register(client, headers, "nothing", area + "none/"), area + "none/")
    assert [d["name"] for d in client.get("/v1/datasets", headers=headers).json()] == ["shapes3"]


def test_prefix_tricks_cannot_leave_the_grant(client, tenant):
    project, headers = tenant
    store = ObjectStore()
    bucket = store.bucket
    put_tree(bucket, f"lab/{project}/mine/")
    put_tree(bucket, f"lab/{project}x/theirs/")  # same string prefix, a different folder
    put_tree(bucket, f"lab/elsewhere-{project}/")
    put_tree(bucket, "cas/fake/")  # looks like a tree, inside the platform's content store
    put_tree(bucket, "mlflow-artifacts/fake/")
    put_tree(f"other-{project[-8:]}", "data/")
    grant(project, f"s3://{bucket}/lab/{project}/")
    before_rows = dataset_rows()
    tricks = {
        f"s3://{bucket}/cas": "cas/", f"s3://{bucket}/cas/": "cas/", f"s3://{bucket}/./cas": "cas/",
        f"s3://{bucket}/a/../cas": "cas/", f"s3://{bucket}/cas//fake//": "cas/fake/",
        f"s3://{bucket}//cas/fake": "cas/fake/", f"s3://{bucket}/mlflow-artifacts/fake": "mlflow-artifacts/fake/",
        f"s3://{bucket}/lab/{project}/../elsewhere-{project}": f"lab/elsewhere-{project}/",
        f"s3://{bucket}/lab/{project}/mine/../../elsewhere-{project}/": f"lab/elsewhere-{project}/",
        f"s3://{bucket}/lab/{project}x/theirs": f"lab/{project}x/theirs/",
        f"s3://{bucket}/lab/": "lab/",
    }
    messages = set()
    for uri, normalised in tricks.items():
        messages.add(generic(register(client, headers, "trick", uri), f"s3://{bucket}/{normalised}"))
    other = f"s3://other-{project[-8:]}/data/"
    messages.add(generic(register(client, headers, "trick", other), other))
    assert len(messages) == 1  # one answer for every refusal: nothing to learn about what exists
    assert dataset_rows() == before_rows
    r = register(client, headers, "mine", f"s3://{bucket}/lab/{project}/x/../mine")
    assert r.status_code == 201, r.json()


def test_another_projects_area_is_refused_even_inside_a_wider_grant(client, tenant, monkeypatch):
    from services.datasets import storage
    from tests.conftest import new_project_key

    project, headers = tenant
    other, _ = new_project_key("neighbour")
    bucket = ObjectStore().bucket
    put_tree(bucket, f"shared-{project}/mine/")
    put_tree(bucket, f"shared-{project}/{other}/data/")
    grant(other, f"s3://{bucket}/shared-{project}/{other}/")
    # an operator's config grants the whole area; the neighbour's part of it is still not this project's
    monkeypatch.setattr(get_settings(), "STORAGE_GRANTS", {project: [f"s3://{bucket}/shared-{project}/"]})
    uri = f"s3://{bucket}/shared-{project}/"
    generic(register(client, headers, "all", uri), uri)
    uri = f"s3://{bucket}/shared-{project}/{other}/data/"
    generic(register(client, headers, "theirs", uri), uri)
    assert register(client, headers, "mine", f"s3://{bucket}/shared-{project}/mine/").status_code == 201
    # the grant command refuses what would overlap another project, and the platform's own areas
    with pytest.raises(ValueError, match="overlaps"):
        grant(project, f"s3://{bucket}/shared-{project}/{other}/data/")
    for reserved in ("cas", "./cas/sha256", "mlflow-artifacts/"):
        with pytest.raises(ValueError, match="platform"):
            grant(project, f"s3://{bucket}/{reserved}")
    with pytest.raises(ValueError, match="whole bucket"):
        grant(project, f"s3://{bucket}/")
    # exactly the same prefix may be shared on purpose
    grant(project, f"s3://{bucket}/shared-{project}/{other}/")
    with session_scope() as s:
        assert (other, f"s3://{bucket}/shared-{project}/{other}/") in storage.list_grants(session=s)


def test_revoked_grant_stops_new_jobs_and_a_changed_prefix_fails_the_worker(client, tenant, tmp_path):
    from services.datasets import storage
    from workers.runtime.inputs import DatasetChanged, prepare_dataset

    project, headers = tenant
    store = ObjectStore()
    put_tree(store.bucket, f"lab/{project}/pinned/", per_class=6)
    grant(project, f"s3://{store.bucket}/lab/{project}/")
    ds = register(client, headers, "pinned", f"s3://{store.bucket}/lab/{project}/pinned/").json()
    spec = {"kind": "ssl-train", "dataset": "pinned", "batch_size": 4, "bank_size": 8}
    job = client.post("/v1/jobs", json=spec, headers=headers)
    assert job.status_code == 201, job.json()
    ref = job.json()["inputs"]["dataset"]
    settings = get_settings().model_copy(update={"DATA_CACHE_DIR": tmp_path})
    assert prepare_dataset(ref, store=store, settings=settings)["path"]
    data = png_bytes(99)
    store.client.put_object(store.bucket, f"lab/{project}/pinned/cat/new.png", io.BytesIO(data), len(data))
    with pytest.raises(DatasetChanged, match="pinned@1 changed since it was registered"):
        prepare_dataset(ref, store=store, settings=settings)
    with session_scope() as s:
        assert storage.revoke(session=s, project_name=project, uri=f"s3://{store.bucket}/lab/{project}") == 1
    r = client.post("/v1/jobs", json=spec, headers=headers)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["body", "dataset"], r.json()
    assert client.get(f"/v1/datasets/{ds['id']}", headers=headers).status_code == 200  # the record stays


def test_admin_grant_storage_cli(stack, tenant):
    from typer.testing import CliRunner

    from services.cli.main import app

    project, _ = tenant
    bucket = ObjectStore().bucket
    runner = CliRunner()
    r = runner.invoke(app, ["admin", "grant-storage", project, f"s3://{bucket}/team/{project}//"])
    assert r.exit_code == 0 and f"s3://{bucket}/team/{project}/" in r.output, r.output
    r = runner.invoke(app, ["admin", "grant-storage", project, f"s3://{bucket}/cas"])
    assert r.exit_code == 1 and "platform" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["admin", "grant-storage", "no-such-project-x", f"s3://{bucket}/z/"])
    assert r.exit_code == 1 and "crucible keys create" in r.output
    r = runner.invoke(app, ["admin", "list-storage", project])
    assert f"{project}  s3://{bucket}/team/{project}/" in r.output
    r = runner.invoke(app, ["admin", "grant-storage", project, f"s3://{bucket}/team/{project}", "--revoke"])
    assert r.exit_code == 0 and "revoked 1" in r.output


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
