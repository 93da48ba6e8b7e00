"""Bounded input: every hostile request gets a 4xx that names the field and the reason, and leaves nothing
behind (no row, no object). Real Postgres and S3; the limits are lowered per test so bodies stay small."""

from __future__ import annotations

import io
import threading
import zipfile

import pytest
from sqlalchemy import func, select

from shared.config import get_settings
from shared.db import session_scope
from shared.models import Job
from tests.api.test_datasets_api import cas_keys, dataset_rows, imagefolder, make_tar, upload

pytestmark = pytest.mark.integration

SPEC = {"kind": "ssl-train", "batch_size": 8, "bank_size": 16}


def job_rows() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Job))


@pytest.fixture
def untouched():
    """Asserts, after the test, that no job, dataset, artifact or stored object was added."""
    before = (job_rows(), dataset_rows(), cas_keys())
    yield
    assert (job_rows(), dataset_rows(), cas_keys()) == before


def only_error(r, status: int = 422) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    (d,) = r.json()["detail"]
    return d


# --- body size: bytes actually received ---------------------------------------------------------------------------
def test_json_body_over_the_limit_is_413_declared_or_chunked(client, auth, monkeypatch, untouched):
    monkeypatch.setattr(get_settings(), "MAX_REQUEST_BYTES", 4096)
    big = b'{"kind": "ssl-train", "name": "' + b"x" * 10_000 + b'"}'
    d = only_error(client.post("/v1/jobs", content=big, headers={**auth, "content-type": "application/json"}), 413)
    assert d["loc"] == ["body"] and "4096-byte limit" in d["msg"]

    def chunks():  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = client.post("/v1/jobs", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert only_error(r, 413)["loc"] == ["body"]
    # any other body is bounded the same way
    r = client.post("/v1/experiments", content=chunks(), headers={**auth, "content-type": "text/plain"})
    assert only_error(r, 413)["loc"] == ["body"]


def test_chunked_upload_over_the_limit_is_413_and_stores_nothing(client, auth, monkeypatch, untouched):
    monkeypatch.setattr(get_settings(), "MAX_UPLOAD_BYTES", 200_000)
    boundary = "crucibleboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.tar\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    sent = []

    def body():
        yield head
        for _ in range(1000):  # 64 MB offered; the API must stop reading long before
            sent.append(1)
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/datasets", content=body(),
                    headers={**auth, "content-type": f"multipart/form-data; boundary={boundary}"})
    d = only_error(r, 413)
    assert d["loc"] == ["body", "file"] and "limit" in d["msg"]


# --- strings and integers that Postgres cannot take ---------------------------------------------------------------
@pytest.mark.parametrize(("body", "loc", "needle"), [
    ({**SPEC, "name": "a\u0000b"}, ["body", "name"], "NUL"),
    ({**SPEC, "tags": {"team": "x\u0007"}}, ["body", "tags", "team"], "U+0007"),
    ({**SPEC, "tags": {"t\u0000": "x"}}, ["body", "tags"], "NUL"),
    ({**SPEC, "priority": 2**70}, ["body", "priority"], "64 bits"),
    ({**SPEC, "seed": 2**40}, ["body", "seed"], "less than or equal"),
    ({**SPEC, "experiment": "exp\n"}, ["body", "experiment"], "letters, digits"),
    ({**SPEC, "resources": {"gpu_class": "a100\n"}}, ["body", "resources", "gpu_class"], "pattern"),
    ({**SPEC, "resources": {"gpu_class": "x" * 40}}, ["body", "resources", "gpu_class"], "pattern"),
    ({**SPEC, "proj_dim": 10**9}, ["body", "proj_dim"], "less than or equal"),
    ({**SPEC, "knn_k": [5000]}, ["body", "knn_k"], "1 to 4096"),
    ({**SPEC, "limit_train": 100, "knn_k": [500]}, ["body", "knn_k"], "training images"),
    ({**SPEC, "tags": {"k": "v" * 300}}, ["body", "tags"], "longer than 256"),
    ({**SPEC, "tags": {"bad key": "v"}}, ["body", "tags"], "tag key"),
    ({**SPEC, "dataset": "pets@99999999999"}, ["body", "dataset"], "version"),
])
def test_bad_strings_and_integers_in_json_are_422(client, auth, body, loc, needle, untouched):
    d = only_error(client.post("/v1/jobs", json=body, headers=auth))
    assert d["loc"] == loc and needle in d["msg"], d


def test_lone_surrogates_nan_infinity_non_utf8_and_deep_nesting_are_422(client, auth, untouched):
    h = {**auth, "content-type": "application/json"}
    d = only_error(client.post("/v1/jobs", content=b'{"kind": "ssl-train", "name": "\\ud800"}', headers=h))
    assert d["loc"] == ["body", "name"] and "surrogate" in d["msg"]
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        d = only_error(client.post("/v1/jobs", content=b'{"kind": "ssl-train", "lr": ' + constant + b"}", headers=h))
        assert d["loc"] == ["body"] and constant.decode().lstrip("-") in d["msg"]
    for path in ("/v1/jobs", "/v1/datasets", "/v1/experiments"):
        d = only_error(client.post(path, content=b'{"name": "caf\xe9"}', headers=h))
        assert d["loc"] == ["body"] and "UTF-8" in d["msg"]
    d = only_error(client.post("/v1/jobs", content=b"[" * 5000 + b"]" * 5000, headers=h))
    assert "nested" in d["msg"]
    d = only_error(client.post("/v1/jobs", content=b"{not json", headers=h))  # FastAPI's own parse error
    assert d["loc"][0] == "body"


@pytest.mark.parametrize(("url", "loc", "needle"), [
    ("/v1/jobs?kind=ssl%00train", ["query", "kind"], "NUL"),
    ("/v1/jobs?experiment=%1b%5b2J", ["query", "experiment"], "U+001B"),
    ("/v1/jobs?offset=99999999999999999999", ["query", "offset"], "64 bits"),
    ("/v1/artifacts?offset=-99999999999999999999", ["query", "offset"], "64 bits"),
    ("/v1/datasets/pets%00", ["path"], "NUL"),
    ("/v1/datasets/pets@99999999999999999999", ["path", "dataset"], "version"),
    ("/v1/datasets/pets@%C2%B2", ["path", "dataset"], "version"),
    ("/v1/experiments/a%ff", ["path", "experiment"], None),  # invalid UTF-8 is replaced, then simply not found
])
def test_bad_path_and_query_parameters_are_4xx(client, auth, url, loc, needle):
    r = client.get(url, headers=auth)
    if needle is None:
        assert r.status_code == 404, r.text
        return
    d = only_error(r)
    assert d["loc"] == loc and needle in d["msg"], d


def test_events_after_beyond_bigint_is_422(client, auth):
    job = client.post("/v1/jobs", json=SPEC, headers=auth).json()
    d = only_error(client.get(f"/v1/jobs/{job['id']}/events?after={2**64}", headers=auth))
    assert d["loc"] == ["query", "after"]


def test_validation_errors_echo_only_a_short_prefix(client, auth, untouched):
    r = client.post("/v1/jobs", json={**SPEC, "dataset": "x" * 200_000, "name": "y" * 100_000}, headers=auth)
    assert r.status_code == 422 and len(r.content) < 4000, len(r.content)
    assert {tuple(d["loc"]) for d in r.json()["detail"]} == {("body", "dataset"), ("body", "name")}
    r = client.post("/v1/jobs", json={"kind": "k" * 100_000}, headers=auth)
    assert r.status_code == 422 and len(r.content) < 2000 and r.json()["detail"][0]["loc"] == ["body", "kind"]
    r = client.post("/v1/jobs", json=[1] * 50_000, headers=auth)  # the whole body is never echoed
    assert r.status_code == 422 and len(r.content) < 2000


# --- uploads ------------------------------------------------------------------------------------------------------
def _zip_with_corrupt_deflate() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in imagefolder().items():
            zf.writestr(name, data + b"\0" * 2000)  # compressible, so the deflate stream is real
    raw = bytearray(buf.getvalue())
    first = raw.index(b"cat/0.png") + len("cat/0.png")
    raw[first + 10:first + 60] = b"\xff" * 50  # inside the first member's deflate stream
    return bytes(raw)


def _tgz_with_corrupt_gzip() -> bytes:
    raw = bytearray(make_tar(imagefolder(per_class=20)))
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\x00" * 64
    return bytes(raw)


def _bz2_named_tar() -> bytes:
    import bz2

    return bz2.compress(b"\0" * 10_000_000)


def _bomb() -> bytes:  # 8 MB of zeros in a few kB: far above the ratio limit
    return make_tar({**imagefolder(), "README": b"\0" * 8_000_000})


@pytest.mark.parametrize(("filename", "payload", "needle"), [
    ("data.zip", _zip_with_corrupt_deflate, "corrupt"),
    # zeroed deflate bytes may still inflate (to garbage): then the image it lands in is what fails
    ("data.tar.gz", _tgz_with_corrupt_gzip, ("corrupt", "not a readable image")),
    ("data.tar", _bz2_named_tar, "bzip2"),
    ("data.tar.gz", _bomb, "compression bomb"),
    ("..", lambda: make_tar(imagefolder()), "file name"),
    ("x" * 300 + ".tar", lambda: make_tar(imagefolder()), "file name"),
])
def test_hostile_archives_are_422_and_leave_nothing(client, auth, monkeypatch, filename, payload, needle,
                                                   untouched):
    from shared.data import archives

    monkeypatch.setattr(archives, "RATIO_FLOOR_BYTES", 0)  # so a small test bomb counts
    d = only_error(upload(client, auth, "hostile", payload(), filename))
    assert d["loc"] == ["body", "file"] and any(n in d["msg"] for n in ([needle] if isinstance(needle, str)
                                                                      else needle)), d


def test_upload_file_name_with_a_nul_byte_is_422(client, auth, untouched):
    boundary = "b0undary"  # built by hand: httpx would percent-encode the NUL
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nnul\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\x00.tar.gz\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + make_tar(imagefolder()) + \
        f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/v1/datasets", content=body,
                    headers={**auth, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code in (400, 422), r.text[:300]
    if r.status_code == 422:
        assert only_error(r)["loc"] == ["body", "file"]


def test_multipart_name_must_fully_match(client, auth, untouched):
    d = only_error(upload(client, auth, "pets\n", make_tar(imagefolder())))
    assert d["loc"] == ["body", "name"]


def test_inspections_are_bounded_503_with_retry_after(client, auth, monkeypatch, untouched):
    from services.datasets import service

    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # another upload is being inspected
    monkeypatch.setattr(service, "_inspections", slots)
    monkeypatch.setattr(service, "INSPECTION_WAIT_S", 0.2)
    r = upload(client, auth, "busy", make_tar(imagefolder()))
    d = only_error(r, 503)
    assert d["loc"] == ["body", "file"] and r.headers["retry-after"] == "5"


def test_concurrent_versions_of_one_name_get_409_not_500(stack):
    """Two transactions record version 1 of one name; the second waits on the unique index, then gets 409."""
    from services.datasets import service
    from services.errors import Conflict
    from tests.conftest import new_project_key

    name, _ = new_project_key("race")
    with session_scope() as s:
        from shared.models import Project

        project_id = s.scalars(select(Project.id).where(Project.name == name)).one()
    kw = {"project_id": project_id, "name": "raced", "source": "prefix", "bucket": "b", "size": 1,
          "stats": {}, "meta": {}}
    outcome: dict[str, object] = {}
    with session_scope() as first:
        service._record(first, key="k1/", sha256="1" * 64, **kw)

        def second() -> None:
            try:
                with session_scope() as s2:  # rolled back on the way out, as a request's session is
                    service._record(s2, key="k2/", sha256="2" * 64, **kw)
            except Conflict as e:
                outcome["error"] = e

        t = threading.Thread(target=second)
        t.start()
        t.join(1.0)
        assert t.is_alive()  # blocked on the first transaction's row
    t.join(10)
    err = outcome.get("error")
    assert isinstance(err, Conflict) and err.status_code == 409 and err.loc == ["body", "name"]


def test_concurrent_uploads_of_one_name_never_500(client, auth):
    results: list[int] = []

    def go(i: int) -> None:
        results.append(upload(client, auth, "same", make_tar(imagefolder(per_class=5 + i))).status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) and set(results) <= {201, 409}, results
    versions = [d["version"] for d in client.get("/v1/datasets", headers=auth).json()]
    assert versions == list(range(1, results.count(201) + 1))


# --- event streams ------------------------------------------------------------------------------------------------
def test_event_stream_has_a_maximum_lifetime(client, auth, monkeypatch):
    monkeypatch.setattr(get_settings(), "SSE_MAX_SECONDS", 1.5)
    job = client.post("/v1/jobs", json=SPEC, headers=auth).json()  # stays queued: no worker runs here
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"follow": "true"}, headers=auth) as r:
        text = "".join(r.iter_text())
    assert r.status_code == 200
    assert "retry: 1000" in text and "reconnect" in text and "event: end" not in text
