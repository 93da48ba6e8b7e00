"""Job kinds, the worker kinds that run them, and the Celery queue of each worker kind.

One declared queue per worker kind; a worker started with ``crucible worker --kind K`` consumes only
``queue_for(K)``. Adding a job kind means adding it to ``JOB_KINDS`` and giving it a spec model in
``shared/specs`` and an entry point in ``workers/<worker_kind>/``.
"""

from __future__ import annotations

# worker kind -> what it runs (the brief's six worker kinds)
WORKER_KINDS: tuple[str, ...] = (
    "ssl-trainer",
    "distiller",
    "poison-scanner",
    "clip-bow-trainer",
    "expert-trainer",
    "router",
)

# job kind -> worker kind. Only kinds with a spec model and an entry point are listed.
JOB_KINDS: dict[str, str] = {
    "ssl-train": "ssl-trainer",
    "eval": "ssl-trainer",  # evaluation runs where the vision stack and GPUs already are
    "distill": "distiller",
}

# job kind -> "module:function" run inside the child process (see workers/runtime/child.py)
ENTRY_POINTS: dict[str, str] = {
    "ssl-train": "workers.ssl_trainer.train:run",
    "eval": "workers.evaluator.run:run",
    "distill": "workers.distiller.train:run",
}


def queue_for(worker_kind: str) -> str:
    """Celery queue name of a worker kind (one queue per kind; GPU classes can extend the suffix)."""
    if worker_kind not in WORKER_KINDS:
        raise ValueError(f"unknown worker kind {worker_kind!r}; known: {', '.join(WORKER_KINDS)}")
    return f"crucible.{worker_kind}"


def worker_kind_for(job_kind: str) -> str:
    try:
        return JOB_KINDS[job_kind]
    except KeyError:
        raise ValueError(f"unknown job kind {job_kind!r}; known: {', '.join(JOB_KINDS)}") from None
