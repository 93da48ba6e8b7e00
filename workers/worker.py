"""``crucible worker --kind K``: a Celery worker consuming one worker kind's queue (or several, or ``all``).

Concurrency 1 and prefetch 1 per worker (one GPU set each; a long job must not hold a second message). The
pool is ``solo``: the task only supervises, the method runs in its own child process, so the Celery process
never imports torch or touches CUDA (platform-design §A.4 pitfalls 3-5).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass

from celery import signals

from shared.kinds import WORKER_KINDS, queue_for

log = logging.getLogger("crucible.worker")


@dataclass(frozen=True)
class Identity:
    worker_id: str
    kinds: set[str]
    label: str


_identity: Identity | None = None
_stop_heartbeat = threading.Event()


def parse_kinds(spec: str) -> set[str]:
    kinds = {k.strip() for k in spec.split(",") if k.strip()}
    if kinds == {"all"}:
        return {"all"}
    unknown = kinds - set(WORKER_KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown worker kind(s) {sorted(unknown)}; choose from {', '.join(WORKER_KINDS)} or 'all'")
    return kinds


def identity() -> Identity:
    global _identity
    if _identity is None:
        kinds = parse_kinds(os.environ.get("CRUCIBLE_WORKER_KIND", "all"))
        label = "all" if kinds == {"all"} else ",".join(sorted(kinds))
        wid = f"{label}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        _identity = Identity(wid, kinds, label)
    return _identity


def queues_for(kinds: set[str]) -> list[str]:
    """The kinds' queues; with ``CRUCIBLE_WORKER_GPU_CLASS=c`` their GPU pool queues ``crucible.<kind>.c`` instead
    (the scheduler sends a job there only when the pool has the GPUs it asks for: CRUCIBLE_GPU_POOLS)."""
    gpu_class = os.environ.get("CRUCIBLE_WORKER_GPU_CLASS", "").strip()
    suffix = f".{gpu_class}" if gpu_class else ""
    return [queue_for(k) + suffix for k in (WORKER_KINDS if kinds == {"all"} else sorted(kinds))]


def _heartbeat_loop(interval: float) -> None:
    from shared.db import session_scope
    from shared.models import Worker, utcnow

    me = identity()
    while not _stop_heartbeat.wait(interval):
        try:
            with session_scope() as s:
                w = s.get(Worker, me.worker_id)
                if w is None:  # the reconciler forgot us after a long stall: register again
                    s.add(Worker(id=me.worker_id, kind=me.label, hostname=socket.gethostname(), pid=os.getpid()))
                else:
                    w.last_heartbeat_at = utcnow()
        except Exception:
            log.warning("worker heartbeat failed; retrying", exc_info=True)


@signals.worker_ready.connect
def _on_ready(**_: object) -> None:
    from shared.config import get_settings
    from shared.db import session_scope
    from shared.models import Worker

    me = identity()
    with session_scope() as s:
        s.merge(Worker(id=me.worker_id, kind=me.label, hostname=socket.gethostname(), pid=os.getpid()))
    threading.Thread(target=_heartbeat_loop, args=(get_settings().HEARTBEAT_SECONDS,), daemon=True).start()
    from workers.runtime.warm import prestart

    prestart(get_settings())  # the first job's child imports torch while the worker waits for it
    log.info("worker %s ready on %s", me.worker_id, ", ".join(queues_for(me.kinds)))


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    # Celery waits for the running task; make that wait short: the child checkpoints and exits 75, and the job
    # is re-queued to resume elsewhere.
    from workers.runtime.supervisor import SHUTDOWN

    SHUTDOWN.set()


@signals.worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    _stop_heartbeat.set()
    from workers.runtime.warm import discard_warm

    discard_warm()
    try:
        from shared.db import session_scope
        from shared.models import Worker

        with session_scope() as s:
            w = s.get(Worker, identity().worker_id)
            if w is not None:
                s.delete(w)
    except Exception:
        log.warning("could not deregister worker", exc_info=True)


def run_worker(kind: str, *, loglevel: str = "INFO") -> None:
    """Start a worker in this process (blocks)."""
    os.environ["CRUCIBLE_WORKER_KIND"] = kind
    me = identity()
    from shared.db import check_schema

    check_schema()
    import workers.tasks  # noqa: F401 - registers the task on the app

    app = workers.tasks.app
    app.worker_main([
        "worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1", "--without-gossip",
        "--without-mingle", "--without-heartbeat", f"--hostname={me.worker_id}", f"--loglevel={loglevel}",
        "-Q", ",".join(queues_for(me.kinds)),
    ])
