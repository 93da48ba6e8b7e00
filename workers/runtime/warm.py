"""Child processes: started cold for a job, or pre-started (warm) and handed the next job.

A fresh interpreter importing torch and the method modules costs seconds per job. The worker pays it once:
when it becomes ready, and again right after each job, it starts ``python -m workers.runtime.child --warm``,
which imports everything (CUDA is not initialised: that happens in the job, in the child) and waits on stdin.
The next job's work dir is written to that pipe. Isolation is unchanged: one job per child process, its own
process group (cancel and SIGKILL take the group), killed with the worker (PDEATHSIG). A warm child that died
or will not take the job is discarded and the job starts cold. ``CRUCIBLE_WARM_CHILD=false`` turns it off.

PDEATHSIG fires when the *thread* that started the child exits, so children are started from the worker's
main thread (the task's thread under the solo pool), never from a short-lived helper thread.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from shared.config import Settings
from workers.runtime.protocol import JOB_ID_PLACEHOLDER

log = logging.getLogger("crucible.supervisor")

_warm: subprocess.Popen[str] | None = None


def spawn_cold(workdir: Path, job_id: str, gpus: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRUCIBLE_JOB_ID": job_id}
    if gpus > 1:
        # One process per GPU on this node; torchrun owns rendezvous (--standalone picks a free port).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "workers.runtime.child", str(workdir)]
    else:
        cmd = [sys.executable, "-m", "workers.runtime.child", str(workdir)]
    return _popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL)


def prestart(settings: Settings) -> None:
    """Have a warm child waiting for the next job (no-op if one is, or if disabled)."""
    global _warm
    if not settings.WARM_CHILD or (_warm is not None and _warm.poll() is None):
        return
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRUCIBLE_JOB_ID": JOB_ID_PLACEHOLDER}
    try:
        _warm = _popen([sys.executable, "-m", "workers.runtime.child", "--warm"], cwd=settings.work_dir, env=env,
                       stdin=subprocess.PIPE)
    except OSError as e:  # jobs still start cold
        log.warning("could not pre-start a warm child: %s", e)
        _warm = None


def take_warm(workdir: Path) -> subprocess.Popen[str] | None:
    """The warm child, now running the job in ``workdir``; None if there is none that will take it."""
    global _warm
    proc, _warm = _warm, None
    if proc is None:
        return None
    if proc.poll() is not None:
        log.warning("the warm child had exited (code %s); starting the job cold", proc.returncode)
        _reap(proc)
        return None
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"{workdir}\n")
        proc.stdin.close()
    except (OSError, ValueError) as e:
        log.warning("the warm child did not take the job (%s); starting it cold", e)
        kill_group(proc, signal.SIGKILL)
        _reap(proc)
        return None
    return proc


def discard_warm() -> None:
    """Worker shutdown: the waiting child goes too."""
    global _warm
    proc, _warm = _warm, None
    if proc is not None:
        kill_group(proc, signal.SIGKILL)
        _reap(proc)


def kill_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc: subprocess.Popen[str]) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if proc.stdout is not None:
        proc.stdout.close()


def _popen(cmd: list[str], *, cwd: Path, env: dict[str, str], stdin: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1, errors="replace",
        start_new_session=True,  # own process group: cancel kills the method and everything it started
        preexec_fn=_die_with_parent,
    )


def _die_with_parent() -> None:
    """If the worker is SIGKILLed, the kernel kills the child too (no orphaned training eating the GPU)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child's own parent watchdog still exits
