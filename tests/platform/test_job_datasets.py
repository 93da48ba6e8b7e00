"""Datasets a job makes (``ctx.save_dataset``), against real Postgres and S3: the next version of the name in the
job's project, lineage to the job's inputs, the id as a named output, root sidecar files kept for the next job."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from shared import lifecycle
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Artifact, ArtifactParent, Dataset, Job, JobStatus
from shared.storage import ObjectStore

SPEC = {"kind": "ssl-train", "method": "msf", "experiment": "made-datasets", "dataset": "builtin://shapes",
        "limit_train": 64, "limit_test": 64, "batch_size": 32, "bank_size": 64, "topk": 3, "knn_k": [1]}


def _image_tree(root: Path, *, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "poison_manifest.json").write_text(json.dumps({"poisoned": ["train/a/0.png"]}))
    return root


def _context(workdir: Path, job_id: uuid.UUID, lines: list[str]):
    from workers.runtime.context import JobContext
    from workers.runtime.protocol import JOB_FILE

    workdir.mkdir()
    (workdir / JOB_FILE).write_text(json.dumps({"job_id": str(job_id), "attempt": 1, "kind": "ssl-train",
                                                "spec": SPEC, "inputs": {}}))
    return JobContext(workdir, emit=lines.append, store=ObjectStore())


@pytest.mark.integration
def test_a_dataset_a_job_makes_is_versioned_with_lineage_named_as_an_output_and_loads_with_its_sidecars(
        client, auth, tmp_path):
    from services.datasets.service import resolve_ref
    from shared.data import load_dataset
    from workers.runtime.events import EventRelay
    from workers.runtime.inputs import prepare_dataset
    from workers.runtime.protocol import EVENT_PREFIX

    r = client.post("/v1/jobs", json=SPEC, headers=auth)
    assert r.status_code == 201, r.text
    job_id = uuid.UUID(r.json()["id"])
    with session_scope() as s:
        assert lifecycle.claim(s, job_id=job_id, attempt=1, worker_id="w", lease_s=60) is not None
        project_id = s.get_one(Job, job_id).project_id
        parent = Artifact(project_id=project_id, kind="dataset", name="source", bucket="b", key="k", sha256="0" * 64)
        s.add(parent)
        s.flush()
        parent_id = parent.id
    lines: list[str] = []
    ctx = _context(tmp_path / "work", job_id, lines)
    relay = EventRelay(job_id, 1, run_id=None, tracker=None, worker_id="w",
                       inputs={"dataset": {"artifact_id": str(parent_id)}})
    tree = _image_tree(tmp_path / "made", seed=0)
    for _ in range(2):  # the same content twice is one version, not two
        ctx.save_dataset(tree, name="made-by-job", output="dataset", meta={"note": "test"})
    for line in lines:
        if line.startswith(EVENT_PREFIX):
            relay.handle_event(line)
    assert relay.flush() and relay.invalid_events == 0

    with session_scope() as s:
        rows = list(s.scalars(select(Dataset).where(Dataset.project_id == project_id, Dataset.name == "made-by-job")))
        assert [d.version for d in rows] == [1]
        ds = rows[0]
        assert ds.stats["train"] == 6 and ds.stats["test"] == 4 and ds.stats["classes"] == ["a", "b"]
        art = s.get_one(Artifact, ds.artifact_id)
        assert art.job_id == job_id and art.kind == "dataset" and art.meta["format"] == "images"
        assert art.meta["note"] == "test"
        assert set(s.scalars(select(ArtifactParent.parent_id).where(ArtifactParent.artifact_id == art.id))) == {
            parent_id}
        assert s.get_one(Job, job_id).outputs == {"dataset": str(ds.id)}
        ref = resolve_ref(session=s, project_id=project_id, ref=str(ds.id))

    # the next job sees the images and the root sidecar file
    local = prepare_dataset(ref, store=ObjectStore(), settings=get_settings())
    assert json.loads((Path(local["path"]) / "poison_manifest.json").read_text()) == {"poisoned": ["train/a/0.png"]}
    data = load_dataset(local, image_size=8)
    assert len(data.train_images) == 6 and data.classes == ["a", "b"]

    # a different tree under the same name is version 2
    ctx.save_dataset(_image_tree(tmp_path / "made2", seed=1), name="made-by-job")
    relay.handle_event(next(x for x in reversed(lines) if x.startswith(EVENT_PREFIX)))
    assert relay.flush()
    with session_scope() as s:
        versions = s.scalars(select(Dataset.version).where(Dataset.project_id == project_id,
                                                           Dataset.name == "made-by-job"))
        assert sorted(versions) == [1, 2]
        job = s.get_one(Job, job_id)
        lifecycle.terminate(s, job, JobStatus.CANCELLED, "test cleanup")


def test_a_job_made_dataset_that_is_not_an_image_tree_is_refused_in_the_method(tmp_path):
    from shared.data.layout import ArchiveError

    lines: list[str] = []
    ctx = _context(tmp_path / "work", uuid.uuid4(), lines)
    (tmp_path / "bad" / "train").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "loose.png").write_bytes(b"not a png")
    with pytest.raises(ArchiveError):
        ctx.save_dataset(tmp_path / "bad", name="bad")
    assert not any(x.startswith("@@") for x in lines)
