"""Bad poison specs are 422s naming the field and the reason, and write nothing (real Postgres and S3)."""

from __future__ import annotations

import pytest

from tests.api.test_datasets_api import cas_keys, dataset_rows, imagefolder, make_tar, upload
from tests.api.test_input_bounds import job_rows, only_error

pytestmark = pytest.mark.integration

POISON = {"kind": "poison", "dataset": "builtin://shapes", "target_class": "circle", "image_size": 16,
          "trigger": {"builtin": "checkerboard", "size": 5}}


@pytest.mark.parametrize(("change", "loc", "needle"), [
    ({"rate": 0}, ["body", "rate"], "outside (0, 1]"),
    ({"rate": 1.5}, ["body", "rate"], "outside (0, 1]"),
    ({"trigger": {"size": 20}}, ["body"], "larger than image_size=16"),
    ({"target_class": "dog"}, ["body"], "not a class of builtin://shapes"),
    ({"trigger": {"png_base64": "bm9wZQ=="}}, ["body", "trigger", "png_base64"], "does not decode"),
])
def test_bad_poison_specs_are_422_and_write_nothing(client, auth, change, loc, needle):
    before = (job_rows(), dataset_rows(), cas_keys())
    d = only_error(client.post("/v1/jobs", json=POISON | change, headers=auth))
    assert d["loc"][:len(loc)] == loc and needle in d["msg"], d
    assert (job_rows(), dataset_rows(), cas_keys()) == before


def test_unknown_target_class_of_an_uploaded_dataset_is_422(client, auth):
    assert upload(client, auth, "pets-for-poison", make_tar(imagefolder(per_class=6))).status_code == 201
    before = job_rows()
    d = only_error(client.post("/v1/jobs", json=POISON | {"dataset": "pets-for-poison", "target_class": "circle"},
                               headers=auth))
    assert d["loc"] == ["body", "target_class"] and "'circle' is not a class of the dataset; one of: cat, dog" \
        in d["msg"]
    assert job_rows() == before
    ok = client.post("/v1/jobs", json=POISON | {"dataset": "pets-for-poison", "target_class": "cat"}, headers=auth)
    assert ok.status_code == 201, ok.text
