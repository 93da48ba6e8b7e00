"""Quiet checkpoints: intermediate checkpoints take at most CHECKPOINT_DUTY of the training wall time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from shared.config import reset_settings

SPEC = {"kind": "ssl-train", "dataset": "builtin://shapes", "epochs": 4, "batch_size": 8, "bank_size": 16,
        "limit_train": 32, "limit_test": 8}


class SlowStore:
    """Stands in for S3: every upload takes ``seconds``."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds

    def put_file(self, path: Path) -> Any:
        time.sleep(self.seconds)
        return self.inner.put_file(path)


@pytest.fixture
def duty(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_duty(value: float) -> None:
        monkeypatch.setenv("CRUCIBLE_CHECKPOINT_DUTY", str(value))
        reset_settings()

    yield set_duty
    reset_settings()


def _stored(events: list[dict[str, Any]]) -> list[int]:
    return [e["epoch"] for e in events if e["type"] == "checkpoint"]


def test_checkpoints_within_the_duty_cycle_are_skipped_and_the_first_final_and_stop_ones_kept(
        job_context: Any, duty: Any) -> None:
    duty(0.1)  # an upload of 0.2 s may happen once every 2 s
    ctx, events, store = job_context("q", "ssl-train", SPEC)
    ctx._store = SlowStore(store, 0.2)
    ctx.save_checkpoint({"w": 1}, epoch=1, step=1)  # the first: always
    ctx.wait_uploads()
    ctx.save_checkpoint({"w": 2}, epoch=2, step=2)  # 0.2 s spent of ~0.2 s elapsed: over budget, skipped
    ctx.wait_uploads()
    assert _stored(events) == [1]
    ctx.stop_requested = True
    ctx.save_checkpoint({"w": 3}, epoch=3, step=3)  # a stop's checkpoint: always (the resume point)
    ctx.stop_requested = False
    ctx.save_checkpoint({"w": 4}, epoch=4, step=4, final=True)  # the final: always, and waited for
    assert _stored(events) == [1, 3, 4]


def test_a_checkpoint_is_stored_again_once_the_budget_allows(job_context: Any, duty: Any) -> None:
    duty(0.5)
    ctx, events, store = job_context("r", "ssl-train", SPEC)
    ctx._store = SlowStore(store, 0.05)
    ctx.save_checkpoint({"w": 1}, epoch=1, step=1)
    ctx.wait_uploads()
    ctx.save_checkpoint({"w": 2}, epoch=2, step=2)  # skipped: ~0.05 s of work in ~0.05 s
    time.sleep(0.3)  # now ~0.05 s of work in ~0.35 s: under half
    ctx.save_checkpoint({"w": 3}, epoch=3, step=3)
    ctx.close()
    assert _stored(events) == [1, 3]


def test_duty_one_stores_every_checkpoint(job_context: Any, duty: Any) -> None:
    duty(1.0)
    ctx, events, store = job_context("s", "ssl-train", SPEC)
    for epoch in (1, 2, 3):
        ctx.save_checkpoint({"w": epoch}, epoch=epoch, step=epoch)
    ctx.close()
    assert _stored(events) == [1, 2, 3]
