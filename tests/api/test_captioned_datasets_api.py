"""Captioned dataset uploads (format=captioned): accepted with their stats, or 422 naming the captions line and
the reason, with nothing stored."""

from __future__ import annotations

import json

import pytest

from tests.api.test_datasets_api import cas_keys, dataset_rows
from tests.clip_archive import captioned_entries, tar_bytes

pytestmark = pytest.mark.integration


def upload(client, auth, name: str, data: bytes, fmt: str | None = "captioned"):
    form = {"name": name} | ({"format": fmt} if fmt else {})
    return client.post("/v1/datasets", data=form, files={"file": ("data.tar.gz", data)}, headers=auth)


def test_captioned_upload_is_accepted_with_caption_stats(client, auth):
    entries = captioned_entries(40, 12)
    captioned = len(entries["captions.jsonl"].splitlines())
    images = sum(p.endswith(".png") for p in entries)
    r = upload(client, auth, "scenes-up", tar_bytes(entries))
    assert r.status_code == 201, r.text
    stats = r.json()["stats"]
    assert stats["format"] == "captioned" and stats["captioned"] == captioned
    assert stats["uncaptioned"] == images - captioned > 0  # images without captions are allowed
    art = client.get(f"/v1/artifacts/{r.json()['artifact_id']}", headers=auth).json()
    assert art["meta"]["format"] == "captioned"
    # the same archive as plain images is fine too (the captions file is a root sidecar)
    assert upload(client, auth, "scenes-plain", tar_bytes(entries), fmt=None).status_code == 201


def _line(image: str, caption: str) -> bytes:
    return json.dumps({"image": image, "caption": caption}).encode()


# {a}, {b}: two images of the archive
@pytest.mark.parametrize(("lines", "needle"), [
    ([b"{good}", _line("train/circle/9999.png", "x")], "line 2: image 'train/circle/9999.png' is not in the archive"),
    ([_line("{b}", "  ")], "line 1: the caption of"),
    ([b"{good}", b'{"image": "{b}", "caption": "caf\xe9"}'], "line 2: not UTF-8"),
    ([b"image,caption", b"{a},a red disk"], "line 1: not a JSON object"),
])
def test_bad_captions_are_422_naming_the_line_and_nothing_is_stored(client, auth, lines, needle):
    entries = captioned_entries(30, 6)
    a, b = sorted(p for p in entries if p.endswith(".png"))[:2]
    good = _line(a, "a red disk")
    entries["captions.jsonl"] = b"\n".join(
        line.replace(b"{good}", good).replace(b"{a}", a.encode()).replace(b"{b}", b.encode()) for line in lines)
    before_rows, before_keys = dataset_rows(), cas_keys()
    r = upload(client, auth, "bad-captions", tar_bytes(entries))
    assert r.status_code == 422, r.text
    assert needle in r.text and "captions rejected" in r.text
    assert dataset_rows() == before_rows and cas_keys() == before_keys


def test_missing_captions_file_and_unknown_format(client, auth):
    entries = captioned_entries(30, 6)
    del entries["captions.jsonl"]
    r = upload(client, auth, "no-captions", tar_bytes(entries))
    assert r.status_code == 422 and "captions.jsonl" in r.text and "missing" in r.text
    r = upload(client, auth, "odd", tar_bytes(entries), fmt="videos")
    assert r.status_code == 422 and "format must be one of" in r.text
