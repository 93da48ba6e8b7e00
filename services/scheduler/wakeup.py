"""Wake the dispatcher when a job becomes runnable, instead of waiting for the next polling cycle.

A submission's single statement runs ``pg_notify('crucible_dispatch', <queue>)`` (services/jobs/submission.py);
Postgres delivers it when the transaction commits, so the scheduler never sees a job before it is visible.
A listener thread holds one ``LISTEN`` connection and sets an event; the loop's polling interval stays the
fallback (and the only path on SQLite, the embedded stack, which has no NOTIFY). A lost connection is
re-opened, and the loop is woken once after each reconnect to cover notifications sent while it was down.
"""

from __future__ import annotations

import logging
import threading

from shared.config import Settings

log = logging.getLogger("crucible.scheduler")

DISPATCH_CHANNEL = "crucible_dispatch"


class Wakeup:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Wakeup:
        if self.settings.DATABASE_URL.startswith("postgresql"):
            self._thread = threading.Thread(target=self._listen, name="dispatch-listener", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def wait(self, timeout: float) -> bool:
        """True when woken by a notification (the event is cleared for the next one)."""
        woke = self.event.wait(timeout)
        self.event.clear()
        return woke

    def _conninfo(self) -> str:
        from sqlalchemy import make_url

        url = make_url(self.settings.DATABASE_URL).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _listen(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo(), autocommit=True,
                                     connect_timeout=self.settings.DB_CONNECT_TIMEOUT_SECONDS) as conn:
                    conn.execute(f"LISTEN {DISPATCH_CHANNEL}")
                    self.event.set()  # anything notified while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.event.set()
            except Exception as e:  # the database went away: poll until it is back
                log.warning("dispatch listener disconnected (%s: %s); polling meanwhile", type(e).__name__, e)
                self._stop.wait(1.0)
