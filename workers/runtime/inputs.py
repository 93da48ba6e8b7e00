"""Materialise a job's inputs on the worker: datasets (cached by content hash) and the resume checkpoint."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.lineage import latest_checkpoint
from shared.models import Artifact
from shared.storage import ObjectStore

_COMPLETE = ".complete"


class ResumeRefused(Exception):
    """The attempt cannot start from its inputs as they are now (a config error, not retried): the latest
    checkpoint was written under a different critical config, or a dataset changed (DatasetChanged)."""


class DatasetChanged(ResumeRefused):
    """A registered prefix no longer holds the objects whose listing was pinned at registration."""


@dataclass
class ResumePoint:
    artifact_id: uuid.UUID
    path: Path
    epoch: int | None
    step: int | None


def prepare_dataset(ref: dict[str, Any], *, store: ObjectStore, settings: Settings) -> dict[str, Any]:
    """The child's view of a dataset input: builtins pass through, stored ones become a local directory."""
    source = ref.get("source")
    if source is None:  # builtin:// - loaded from installed packages inside the child
        return {"uri": ref["uri"]}
    cache = settings.data_cache_dir / "datasets"
    cache.mkdir(parents=True, exist_ok=True)
    if source == "archive" and ref.get("format") == "text":  # a text corpus: its canonical JSONL, as is
        from shared.data.corpus import CORPUS_FILE

        target = cache / f"text-{ref['sha256']}"
        with _locked(target.with_suffix(".lock")):
            if not (target / _COMPLETE).exists():
                _fresh(target)
                store.get_file(ref["key"], target / CORPUS_FILE, bucket=ref.get("bucket"), sha256=ref["sha256"])
                (target / _COMPLETE).touch()
    elif source == "archive":
        target = cache / ref["sha256"]
        with _locked(target.with_suffix(".lock")):  # several workers on one host share the cache
            if not (target / _COMPLETE).exists():
                from shared.data.archives import extract_archive

                archive = cache / f"{ref['sha256']}.archive"
                store.get_file(ref["key"], archive, bucket=ref.get("bucket"), sha256=ref["sha256"])
                _fresh(target)
                extract_archive(archive, target)
                archive.unlink(missing_ok=True)
                (target / _COMPLETE).touch()
    elif source == "prefix":
        listing = store.list_keys(ref["prefix"], bucket=ref["bucket"])
        digest = hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()
        if ref.get("sha256") and digest != ref["sha256"]:
            raise DatasetChanged(
                f"dataset {ref.get('name')}@{ref.get('version')} changed since it was registered: the objects "
                f"under s3://{ref['bucket']}/{ref['prefix']} no longer match the listing pinned then; register "
                "the prefix again (a new version) and submit a new job")
        target = cache / f"prefix-{digest}"
        with _locked(target.with_suffix(".lock")):
            if not (target / _COMPLETE).exists():
                _fresh(target)
                for key, _size, _etag in listing:
                    rel = key[len(ref["prefix"]):].lstrip("/")
                    if rel and ".." not in Path(rel).parts:
                        store.get_file(key, target / rel, bucket=ref["bucket"])
                (target / _COMPLETE).touch()
    else:
        raise ValueError(f"unknown dataset source {source!r}")
    return {"uri": ref["uri"], "path": str(target), "sha256": ref.get("sha256")}


def prepare_checkpoint(session: Any, name: str, ref: dict[str, Any], *, store: ObjectStore,
                       workdir: Path) -> dict[str, Any]:
    """Download a checkpoint input (``job:<id>`` refs resolve now: the job succeeded, it was a dependency)."""
    art = session.get(Artifact, uuid.UUID(ref["artifact_id"])) if ref.get("artifact_id") else None
    if art is None and ref.get("job_id"):
        art = latest_checkpoint(session, uuid.UUID(ref["job_id"]))
    if art is None:
        raise FileNotFoundError(f"input {name}: {ref.get('ref')} has no checkpoint")
    path = store.get_file(art.key, workdir / "inputs" / f"{name}.pt", bucket=art.bucket, sha256=art.sha256)
    return {"ref": ref.get("ref"), "path": str(path), "artifact_id": str(art.id),
            "job_id": str(art.job_id) if art.job_id else None, "meta": art.meta}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_resume_point(ckpt: Artifact, *, critical: dict[str, Any], store: ObjectStore, workdir: Path) -> ResumePoint:
    """Download the checkpoint to resume from, after checking it was made under the same critical config."""
    saved = ckpt.meta.get("critical")
    if saved is not None and saved != critical:
        diff = sorted(k for k in set(saved) | set(critical) if saved.get(k) != critical.get(k))
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {critical.get(k)!r}" for k in diff)
        raise ResumeRefused(f"refusing to resume from checkpoint {ckpt.id}: critical config changed ({changes}); "
                            "submit a new job to train from scratch")
    path = store.get_file(ckpt.key, workdir / "resume.pt", bucket=ckpt.bucket, sha256=ckpt.sha256)
    return ResumePoint(ckpt.id, path, ckpt.meta.get("epoch"), ckpt.meta.get("step"))


def _fresh(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
