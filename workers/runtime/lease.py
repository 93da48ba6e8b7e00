"""``LeaseKeeper``: renews an attempt's lease from the moment of the claim until the attempt is recorded.

A background thread, so that nothing the supervisor does in between - downloading a large dataset, fetching
the resume checkpoint, waiting on MLflow - can make a live worker look lost. It also reads the cancel flag
(the renewal's ``RETURNING``). Renewal is fenced (``lifecycle.renew_lease``): once a lease has lapsed it is
never extended again; the keeper reports it lost and ``on_lost`` stops the method at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from shared import lifecycle
from shared.db import session_scope

log = logging.getLogger("crucible.supervisor")


class LeaseKeeper:
    def __init__(self, job_id: uuid.UUID, attempt: int, worker_id: str, *, lease_s: float, interval_s: float,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.job_id, self.attempt, self.worker_id = job_id, attempt, worker_id
        self.lease_s, self.interval_s = lease_s, max(0.05, min(interval_s, lease_s / 3))
        self.on_lost = on_lost
        self.lost = threading.Event()
        self.cancel_requested = False
        self.stop_reason: str | None = None  # "pruned": the stop is the job's sweep pruning it
        self.preempt_requested = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    @property
    def held(self) -> bool:
        return not self.lost.is_set()

    def renew_once(self) -> None:
        try:
            with session_scope() as s:
                state = lifecycle.renew_lease(s, job_id=self.job_id, attempt=self.attempt,
                                              worker_id=self.worker_id, lease_s=self.lease_s)
        except Exception as e:  # a database blip: try again; if it outlasts the lease, the next renewal says so
            log.warning("job %s: lease renewal failed (retrying): %s", self.job_id, e)
            return
        if state.held:
            self.cancel_requested = state.cancel_requested
            self.stop_reason = state.stop_reason
            self.preempt_requested = state.preempt_requested
            return
        if not self.lost.is_set():
            log.warning("job %s attempt %d: lease lost; this attempt will write nothing more", self.job_id,
                        self.attempt)
            self.lost.set()
            if self.on_lost is not None:
                self.on_lost()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s) and not self.lost.is_set():
            self.renew_once()
