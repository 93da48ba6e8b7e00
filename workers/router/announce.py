"""The replica's entry in the placement table (shared/serving.py): renewed every heartbeat, removed on stop.

Its own thread, so a long model load or a long batch never lets the entry lapse while the replica is alive;
a killed replica stops renewing and its entry expires after ``TTL_HEARTBEATS`` heartbeats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from shared import serving

log = logging.getLogger("crucible.router")


class Announcer:
    def __init__(self, redis: Any, announcement: serving.Announcement, *, heartbeat_s: float,
                 refresh: Callable[[serving.Announcement], None] | None = None) -> None:
        self.redis, self.heartbeat_s = redis, heartbeat_s
        self.announcement = announcement
        self._refresh = refresh  # fills live fields (resident adapters, queue depth) before each renewal
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="router-announce", daemon=True)

    @property
    def ttl_s(self) -> int:
        return max(1, int(round(self.heartbeat_s * serving.TTL_HEARTBEATS)))

    def start(self) -> Announcer:
        self.announce()
        self._thread.start()
        return self

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.announcement = self.announcement.model_copy(update=fields)
        self.announce()

    def announce(self) -> None:
        with self._lock:
            if self._refresh is not None:
                try:
                    self._refresh(self.announcement)
                except Exception:  # live stats are best effort; the entry itself must be renewed
                    log.debug("announcement refresh failed", exc_info=True)
            a = self.announcement.model_copy(update={"updated_at": time.time()})
        index = serving.set_index_key(a.expert_set)
        pipe = self.redis.pipeline()
        pipe.set(serving.replica_key(a.replica_id), a.model_dump_json(), ex=self.ttl_s)
        pipe.sadd(index, a.replica_id)
        pipe.expire(index, serving.SET_INDEX_TTL_S)
        pipe.execute()

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.announce()
            except Exception as e:  # a Redis blip: the next heartbeat tries again (the TTL covers three)
                log.warning("router announcement failed (retrying): %s", e)

    def withdraw(self) -> None:
        """Leave the table now (stop or failure): the control plane stops sending here at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        a = self.announcement
        try:
            pipe = self.redis.pipeline()
            pipe.delete(serving.replica_key(a.replica_id))
            pipe.srem(serving.set_index_key(a.expert_set), a.replica_id)
            pipe.execute()
        except Exception as e:  # the TTL removes it anyway
            log.warning("could not withdraw the router announcement: %s", e)
