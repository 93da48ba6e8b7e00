"""``JobContext``: everything a method sees of the platform, inside the child process.

A method is a plain function ``run(ctx: JobContext) -> None``. It reads ``ctx.spec`` and
``ctx.inputs``, reports ``ctx.progress``/``ctx.log_metrics``, checkpoints with ``ctx.save_checkpoint``
(to the object store, so a retried attempt on another machine can resume), resumes with
``ctx.load_checkpoint()``, and calls ``ctx.check_preempt(save)`` at step boundaries so a SIGTERM
(cancel, deadline, worker shutdown) turns into "checkpoint, then exit 75".

Under torchrun (``resources.gpus > 1``) every rank builds a context from the same work dir. It is
rank-aware (``RANK``/``WORLD_SIZE``): only rank 0 emits events and uploads checkpoints/artifacts; the
other ranks report nothing (their output would duplicate rank 0's) but still read inputs and the resume
checkpoint. A single process is rank 0 of 1, unchanged.

Events go to the event channel (protocol.py), log lines to stdout. Checkpoints are serialised on the
training thread (the state shares storage with the live model) but hashed and uploaded by a background
thread: the step loop continues while the previous checkpoint uploads. At most one upload is in flight; a
final checkpoint, a preemption (``check_preempt``) and ``close()`` (job end) wait for it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, cast

from pydantic import ValidationError
from typing_extensions import TypeVar

from shared.specs import JobSpecBase, parse_spec
from workers.runtime.protocol import EVENTS_FIFO, JOB_FILE, encode_event

log = logging.getLogger("crucible.context")


class Preempted(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Raised by ``check_preempt`` after the method saved its state; the child exits EXIT_PREEMPTED."""


class JobConfigError(Exception):
    """The job cannot run as specified (e.g. a dataset too small for the bank); not retried."""


# The default keeps ``JobContext(workdir)`` (kind known only at run time) a ``JobContext[JobSpecBase]``.
SpecT = TypeVar("SpecT", bound=JobSpecBase, default=JobSpecBase)


class JobContext(Generic[SpecT]):
    """Implements ``workers.common.context.MethodContext[SpecT]``; ``SpecT`` is the spec model of ``kind``."""

    def __init__(self, workdir: Path, *, emit: Callable[[str], None] | None = None,
                 store: Any | None = None) -> None:
        self.workdir = Path(workdir)
        job = json.loads((self.workdir / JOB_FILE).read_text())
        self.job_id: str = job["job_id"]
        self.attempt: int = int(job["attempt"])
        self.kind: str = job["kind"]
        try:
            # the kind registry ties kind to spec type
            self.spec: SpecT = cast(SpecT, parse_spec(job["spec"]))
        except ValidationError as e:
            raise JobConfigError(f"the job's spec does not validate: {e}") from e
        self.inputs: dict[str, Any] = job.get("inputs", {})
        resume = job.get("resume") or {}
        self.resume_path: Path | None = Path(resume["path"]) if resume.get("path") else None
        self.resume_info: dict[str, Any] = resume
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self._emit: Callable[[str], None]
        self._log_line: Callable[[str], None]
        if not self.is_main:
            self._emit, self._log_line = _drop_line, _drop_line
        elif emit is not None:  # tests: one sink for both
            self._emit, self._log_line = emit, emit
        else:
            self._emit, self._log_line = _channel(self.workdir), _print_line
        self._store = store
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None
        self._seq = 0
        self._last_stored_at: float | None = None  # monotonic time the last stored checkpoint started
        self._last_cost_s = 0.0  # what it cost: serialisation on this thread + hash and upload in the background
        self.stop_requested = False
        self._t0 = time.monotonic()
        self._done0: int | None = None
        self._last_progress = 0.0

    @property
    def is_main(self) -> bool:
        """Rank 0 (the only process of a single-process job) reports and saves for the whole job."""
        return self.rank == 0

    # --- signals -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only set a flag: the method stops at its next step boundary, after saving."""

        def _handler(signum: int, _frame: Any) -> None:
            self.stop_requested = True
            self.log(f"received signal {signum}: will checkpoint and stop at the next step boundary")

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def check_preempt(self, save: Callable[[], Any] | None = None) -> None:
        """If a stop was requested: run ``save`` (typically a checkpoint), wait for its upload, raise ``Preempted``."""
        if self.stop_requested:
            if save is not None:
                save()
            self.wait_uploads()
            raise Preempted()

    # --- reporting ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self._log_line(message)

    def event(self, event_type: str, **payload: Any) -> None:
        try:
            line = encode_event(event_type, **payload)
        except ValidationError as e:  # a bad report must not stop training; say what was wrong instead
            self.log(f"dropped an invalid {event_type} event: {e}")
            return
        self._emit(line)

    def progress(self, done: int, total: int, *, epoch: int | None = None, unit: str = "step",
                 min_interval_s: float = 0.5) -> None:
        """Report progress; ETA is estimated from this attempt's rate (resumed work is not counted)."""
        now = time.monotonic()
        if self._done0 is None:
            self._done0, self._t0 = done, now
        if done < total and now - self._last_progress < min_interval_s:
            return
        self._last_progress = now
        rate_n = done - self._done0
        eta = (now - self._t0) / rate_n * (total - done) if rate_n > 0 else None
        self.event("progress", done=done, total=total, epoch=epoch, unit=unit,
                   eta_s=None if eta is None else round(eta, 1))

    def log_metrics(self, values: dict[str, float], *, step: int) -> None:
        clean = {k: float(v) for k, v in values.items()}
        self.event("metrics", step=int(step), values=clean)

    def set_result(self, values: dict[str, float]) -> None:
        """The job's headline metrics (stored on the job row and as MLflow metrics)."""
        self.event("result", values={k: float(v) for k, v in values.items()})

    def save_output(self, name: str, value: Any) -> None:
        """A named JSON value this job produced (e.g. the list a pipeline's next step fans out over); kept on
        the job row (``jobs.outputs``). Declare it in the job kind's ``outputs`` so pipelines can check uses."""
        json.dumps(value)  # fail here, in the method, rather than in the supervisor
        self.event("output", name=str(name), value=value)

    # --- checkpoints and artifacts -----------------------------------------------------------
    @property
    def store(self) -> Any:
        if self._store is None:
            from shared.storage import ObjectStore

            self._store = ObjectStore()
        return self._store

    def save_checkpoint(self, state: dict[str, Any], *, epoch: int, step: int, final: bool = False) -> str:
        """Save ``state`` (with the spec's critical config) to the object store.

        Serialises now, uploads in the background (the previous upload is waited for first, so checkpoints
        are recorded in order and at most two are on local disk). ``final=True`` waits for its own upload and
        returns the object key; otherwise returns "" at once. On ranks other than 0 nothing is written
        (returns ""): rank 0 holds the same state."""
        if not self.is_main:
            return ""
        if not self._should_store(final):
            return ""
        import torch

        started = time.monotonic()
        payload = dict(state)
        critical = self.spec.critical_config()
        payload["crucible"] = {
            "job_id": self.job_id, "attempt": self.attempt, "epoch": epoch, "step": step,
            "critical": critical, "spec": self.spec.model_dump(mode="json"),
        }
        self._seq += 1
        path = self.workdir / f"checkpoint-{self._seq}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        self.wait_uploads()
        keys: list[str] = []
        serialised_s = time.monotonic() - started
        self._last_stored_at, self._last_cost_s = started, serialised_s

        def upload() -> None:
            t0 = time.monotonic()
            try:
                obj = self.store.put_file(path)  # hashes, then uploads unless the content is there already
                self._last_cost_s = serialised_s + (time.monotonic() - t0)
                self.event("checkpoint", epoch=epoch, step=step, key=obj.key, sha256=obj.sha256, size=obj.size,
                           final=final, critical=critical)
                keys.append(obj.key)
            except BaseException as e:  # surfaced on the training thread at the next save/wait
                self._upload_error = e
            finally:
                path.unlink(missing_ok=True)

        self._upload = threading.Thread(target=upload, name=f"checkpoint-upload-{self._seq}", daemon=True)
        self._upload.start()
        if final:
            self.wait_uploads()
            return keys[0] if keys else ""
        return ""

    def _should_store(self, final: bool) -> bool:
        """Whether this checkpoint is stored: quiet training keeps checkpoint work under ``CHECKPOINT_DUTY`` of
        the wall time (a skipped one costs nothing: not even serialised). The first, the final and a stop's
        checkpoint are always stored, so resume loses at most ~cost/duty seconds of work to a hard kill."""
        from shared.config import get_settings

        duty = get_settings().CHECKPOINT_DUTY
        if final or self.stop_requested or self._last_stored_at is None or duty >= 1:
            return True
        if self._upload is not None and self._upload.is_alive():
            return False  # the previous one is still on its way: this one would only queue behind it
        elapsed = time.monotonic() - self._last_stored_at
        return self._last_cost_s <= duty * elapsed

    def wait_uploads(self) -> None:
        """Block until the checkpoint upload in flight (if any) is done; re-raise its failure here."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise RuntimeError(f"checkpoint upload failed: {err}") from err

    def close(self) -> None:
        """Job end: the last checkpoint's upload completes (and is reported) before the process exits."""
        self.wait_uploads()

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state to resume from, or None on a fresh start."""
        if self.resume_path is None:
            return None
        import torch

        # weights_only=False: our own checkpoints carry plain-python metadata next to tensors.
        state: dict[str, Any] = torch.load(self.resume_path, map_location="cpu", weights_only=False)
        return state

    def save_artifact(self, path: Path, *, name: str, artifact_kind: str = "file",
                      meta: dict[str, Any] | None = None) -> str:
        if not self.is_main:
            return ""
        obj = self.store.put_file(Path(path))
        self.event("artifact", name=name, artifact_kind=artifact_kind, key=obj.key, sha256=obj.sha256,
                   size=obj.size, meta=meta or {})
        return str(obj.key)

    def save_dataset(self, directory: Path, *, name: str, format: str = "images", output: str | None = None,
                     stats: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> None:
        """Store ``directory`` as a new dataset the job made: the next version of ``name`` in the job's project,
        descended from the job's input dataset and checkpoints; with ``output``, its id is that named output
        (a pipeline's next step passes ``dataset: ${steps.<step>.outputs.<output>}``).

        Format "images" is an ImageFolder tree (``train/<class>/...``, optional ``test/<class>/...``) plus any
        non-image files at its root (a manifest, captions): they are validated like an upload, and a later job
        finds the root files beside the images in ``ctx.inputs["dataset"]["path"]``. Other formats are stored
        as they are, with the caller's ``stats``. The archive is deterministic (sorted, no timestamps), so the
        same content is the same object and not a new version."""
        if not self.is_main:
            return
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"save_dataset: {directory} is not a directory")
        archive = self.workdir / f"dataset-{name}.tar"
        _deterministic_tar(directory, archive)
        try:
            if format == "images":
                from shared.data.archives import inspect_archive
                from shared.datasets import archive_stats

                stats = {**archive_stats(inspect_archive(archive)), **(stats or {})}
            obj = self.store.put_file(archive)
        finally:
            archive.unlink(missing_ok=True)
        self.event("dataset", name=name, format=format, key=obj.key, sha256=obj.sha256, size=obj.size,
                   stats=stats or {}, meta=meta or {}, output=output)


def _deterministic_tar(directory: Path, archive: Path) -> None:
    """A plain tar of ``directory``'s files in sorted order with zeroed owners and times (same files → same bytes)."""
    import tarfile

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)


def _drop_line(line: str) -> None:
    """Event sink of non-zero ranks."""


def _channel(workdir: Path) -> Callable[[str], None]:
    """Writer of the event channel: the supervisor's FIFO if there is one, else stdout (a bare ``child WORKDIR``
    run by hand). Thread-safe (the checkpoint uploader reports from its own thread); whole lines only."""
    fifo = workdir / EVENTS_FIFO
    if not fifo.exists():
        return _print_line
    fd = os.open(fifo, os.O_WRONLY)  # the supervisor holds the read end open before the child starts
    lock = threading.Lock()

    def write(line: str) -> None:
        data = (line + "\n").encode()
        with lock:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

    return write


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
