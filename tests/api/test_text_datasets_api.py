"""Text corpora (format=text) through POST /v1/datasets against the real S3 server and Postgres: validated on
upload (a 422 naming the line or entry and the reason, nothing stored), the canonical JSONL stored, and a job
input that names the format."""

from __future__ import annotations

import json

import httpx
import pytest

from shared.data.corpus import read_jsonl
from tests.api.test_datasets_api import cas_keys, dataset_rows, make_tar

pytestmark = pytest.mark.integration


def upload_text(client, auth, name: str, data: bytes, filename: str = "corpus.jsonl", fmt: str = "text"):
    return client.post("/v1/datasets", data={"name": name, "format": fmt}, files={"file": (filename, data)},
                       headers=auth)


def jsonl(records: list[dict[str, str]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


DOCS = [{"text": f"a story about the harbour and its boats, number {i}", "topic": "news"} for i in range(10)] + \
       [{"text": f"def parse(line): return line.split(',') # helper {i}", "topic": "code"} for i in range(10)]


def test_a_jsonl_corpus_is_validated_stored_canonically_and_resolved_as_text(client, auth):
    r = upload_text(client, auth, "stories", jsonl(DOCS))
    assert r.status_code == 201, r.json()
    ds = r.json()
    assert ds["stats"]["documents"] == 20 and ds["stats"]["topics"] == {"code": 10, "news": 10}
    assert ds["stats"]["format"] == "text" and ds["stats"]["train"] + ds["stats"]["test"] == 20
    art = client.get(f"/v1/artifacts/{ds['artifact_id']}", headers=auth).json()
    stored = read_jsonl(httpx.get(art["download_url"]).content)
    assert sorted(stored.texts) == sorted(d["text"] for d in DOCS)
    assert stored.splits.count("test") == ds["stats"]["test"]  # the split is decided once, at upload
    job = client.post("/v1/jobs", json={"kind": "embed", "dataset": "stories", "embedder": {"kind": "tfidf-svd"}},
                      headers=auth)
    assert job.status_code == 201, job.json()
    assert job.json()["inputs"]["dataset"]["format"] == "text"
    client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=auth)


def test_a_text_archive_uploads_with_topics_from_folders(client, auth):
    data = make_tar({"news/1.txt": b"the ferry was late again", "news/2.txt": b"storms closed the port",
                     "code/1.txt": b"import os\nprint(os.getcwd())", "code/2.txt": b"x = [i for i in range(3)]"})
    r = upload_text(client, auth, "folders", data, "corpus.tar.gz")
    assert r.status_code == 201, r.json()
    assert r.json()["stats"]["topics"] == {"code": 2, "news": 2} and r.json()["stats"]["source_format"] == "tar.gz"


@pytest.mark.parametrize("filename,payload,needle", [
    ("c.jsonl", b'{"text": "fine"}\n{"text": "broken\n', "line 2: not valid JSON"),
    ("c.jsonl", b'{"text": "fine"}\n{"body": "typo"}\n', "line 2: unknown key(s) ['body']"),
    ("c.jsonl", b'{"text": "a", "topic": "x"}\n{"text": "b"}\n', "every document has a 'topic' or none"),
    ("c.jsonl", b"\xff\xfe\x00", "not UTF-8"),
    ("c.tar.gz", make_tar({"news/a.txt": b"\xff bad bytes"}), "entry news/a.txt: not UTF-8"),
    ("c.tar.gz", make_tar({"notes.md": b"no txt here"}), "no .txt documents"),
    ("c.csv", b"text\nhello\n", "unsupported text corpus"),
])
def test_bad_corpora_are_rejected_naming_the_line_and_leave_nothing(client, auth, filename, payload, needle):
    before_keys, before_rows = cas_keys(), dataset_rows()
    r = upload_text(client, auth, "bad-text", payload, filename)
    assert r.status_code == 422, r.json()
    (d,) = r.json()["detail"]
    assert d["loc"] == ["body", "file"] and needle in d["msg"], d
    assert cas_keys() == before_keys and dataset_rows() == before_rows


def test_an_unknown_format_is_refused(client, auth):
    r = upload_text(client, auth, "odd", jsonl(DOCS), fmt="audio")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "format"] and "images" in r.json()["detail"][0]["msg"]
