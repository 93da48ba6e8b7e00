"""Fixtures shared by the distiller and evaluator tests: a tiny dataset and MSF checkpoints made by ssl-train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

# Shared by all the vision tests: the checkpoints are made with the exact sizes below.
TINY: dict[str, Any] = {"dataset": "builtin://shapes", "limit_train": 128, "limit_test": 64, "image_size": 32,
                        "backbone": "resnet18", "stem": "imagenet", "batch_size": 32, "knn_k": [1, 20]}


@pytest.fixture(scope="session")
def tiny_dataset() -> Any:
    from shared.data import load_dataset

    return load_dataset({"uri": TINY["dataset"]}, image_size=TINY["image_size"], limit_train=TINY["limit_train"],
                        limit_test=TINY["limit_test"])


@pytest.fixture(scope="session")
def msf_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Any) -> list[Path]:
    """Checkpoints of a 2-epoch MSF run made by ssl-train's ``train()``: ``[epoch 1, final (epoch 2)]``."""
    from shared.specs import SslTrainSpec
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train

    torch.set_num_threads(1)
    spec = SslTrainSpec.model_validate({"kind": "ssl-train", "method": "msf", **TINY, "bank_size": 64, "epochs": 2,
                                        "proj_hidden_dim": 128, "proj_dim": 32})
    ctx = LocalContext(spec, checkpoint_dir=tmp_path_factory.mktemp("msf-teacher"))
    train(spec, tiny_dataset, ctx=ctx)
    return [Path(c["path"]) for c in ctx.checkpoints]


class DirStore:
    """Object-store stand-in: content-addressed copies in a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put_file(self, path: Path) -> Any:
        import hashlib
        import shutil
        from types import SimpleNamespace

        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        shutil.copyfile(path, self.root / digest)
        return SimpleNamespace(key=f"cas/sha256/{digest}", sha256=digest, size=Path(path).stat().st_size)

    def path(self, key: str) -> Path:
        return self.root / key.rsplit("/", 1)[-1]


@pytest.fixture
def job_context(tmp_path: Path) -> Any:
    """``job_context(name, kind, spec, checkpoints={...}, resume=path) -> (JobContext, events, store)``."""
    import json

    from workers.runtime.context import JobContext
    from workers.runtime.protocol import JOB_FILE, decode_line

    store = DirStore(tmp_path / "store")

    def make(name: str, kind: str, spec: dict[str, Any], *, checkpoints: dict[str, Path] | None = None,
             resume: Path | None = None) -> tuple[Any, list[dict[str, Any]], DirStore]:
        workdir = tmp_path / name
        workdir.mkdir()
        inputs: dict[str, Any] = {"dataset": {"uri": spec.get("dataset", "builtin://shapes")}}
        if checkpoints:
            inputs["checkpoints"] = {k: {"path": str(p), "artifact_id": None, "job_id": None, "meta": {}}
                                     for k, p in checkpoints.items()}
        job = {"job_id": "00000000-0000-0000-0000-0000000000aa", "attempt": 1 if resume is None else 2,
               "kind": kind, "spec": spec, "inputs": inputs, "resume": {"path": str(resume)} if resume else None}
        (workdir / JOB_FILE).write_text(json.dumps(job))
        events: list[dict[str, Any]] = []

        def emit(line: str) -> None:
            event = decode_line(line)
            events.append(event if event is not None else {"type": "log", "message": line})

        return JobContext(workdir, emit=emit, store=store), events, store

    return make
