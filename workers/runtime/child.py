"""Child-process entry point: ``python -m workers.runtime.child WORKDIR`` or ``... child --warm``.

Runs the job kind's method with a ``JobContext`` and turns the way it ended into an exit code the supervisor
understands (see protocol.py). CUDA is only ever initialised here, never in the Celery worker.

``--warm`` is the pre-started child (warm.py): it imports torch and the method modules of the worker's kinds
(no CUDA initialisation: importing torch does not create a context), then blocks on stdin for one line, the
work dir of its job, and runs that job exactly like a cold child. One job per process: GPU memory and any
state the method left behind go away with it.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from workers.runtime.context import JobConfigError, JobContext, Preempted
from workers.runtime.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, JOB_ID_PLACEHOLDER, RANK0_EXIT_FILE


def _watch_parent(parent: int) -> None:
    """Exit if the supervisor disappears (PDEATHSIG covers Linux; this covers the rest and torchrun ranks)."""
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            os._exit(EXIT_PREEMPTED)


def main(argv: list[str]) -> int:
    args = argv[1:]
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    if args == ["--warm"]:
        workdir = _warm_up_and_wait()
        if workdir is None:  # the supervisor closed our stdin: no job for us
            return EXIT_OK
    elif len(args) == 1 and not args[0].startswith("-"):
        workdir = Path(args[0])
    else:
        print("usage: python -m workers.runtime.child WORKDIR | --warm", file=sys.stderr)
        return EXIT_CONFIG
    return run_job(workdir)


def run_job(workdir: Path) -> int:
    try:
        ctx = JobContext(workdir)
    except JobConfigError as e:
        print(f"configuration error: {e}", flush=True)
        return EXIT_CONFIG
    ctx.install_signal_handlers()
    code = _run(_entry_point(ctx.kind), ctx)
    if ctx.world_size > 1 and ctx.is_main:
        # torchrun exits 1 whenever a rank fails; rank 0's own code (preempted / config error) is what counts.
        (workdir / RANK0_EXIT_FILE).write_text(str(code))
    return code


def _entry_point(kind: str) -> Callable[[JobContext], None]:
    from shared.kinds import ENTRY_POINTS

    module_name, _, func_name = ENTRY_POINTS[kind].partition(":")
    run: Callable[[JobContext], None] = getattr(importlib.import_module(module_name), func_name)
    return run


def _run(run: Callable[[JobContext], None], ctx: JobContext) -> int:
    try:
        try:
            run(ctx)
        finally:
            ctx.close()  # the last checkpoint's upload finishes (and is reported) whatever happened
    except Preempted:
        ctx.log("stopped after checkpointing; the job will resume from it")
        return EXIT_PREEMPTED
    except JobConfigError as e:
        ctx.log(f"configuration error: {e}")
        return EXIT_CONFIG
    except Exception as e:
        traceback.print_exc(file=sys.stdout)
        ctx.log(f"{type(e).__name__}: {e}")
        return 1
    return EXIT_OK


# --- the warm child ------------------------------------------------------------------------------------------
def _warm_up_and_wait() -> Path | None:
    from shared.kinds import ENTRY_POINTS, JOB_KINDS

    served = {k.strip() for k in os.environ.get("CRUCIBLE_WORKER_KIND", "all").split(",")}
    for module in ("torch", "torchvision", "faiss"):
        _try_import(module)
    for kind, target in ENTRY_POINTS.items():
        if "all" in served or JOB_KINDS.get(kind) in served:
            _try_import(target.partition(":")[0])
    line = sys.stdin.readline()
    # The method must not read the supervisor's pipe.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if not line.strip():
        return None
    workdir = Path(line.strip())
    os.chdir(workdir)
    try:
        import json

        from workers.runtime.protocol import JOB_FILE

        set_visible_env("CRUCIBLE_JOB_ID", str(json.loads((workdir / JOB_FILE).read_text())["job_id"]))
    except (OSError, ValueError, KeyError):
        pass  # run_job reports a broken job file
    return workdir


def _try_import(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as e:  # the job itself will fail with the real error, if it needs the module
        print(f"warm child: could not pre-import {module}: {e}", file=sys.stderr, flush=True)


def set_visible_env(name: str, value: str) -> None:
    """Set ``name`` for this process and what it starts, and - where it was started with the placeholder -
    also in the initial environment block the kernel shows as /proc/PID/environ (operators and tests find a
    job's processes by it). The block is rewritten in place, same length, like setproctitle does for argv."""
    os.environ[name] = value
    if len(value) != len(JOB_ID_PLACEHOLDER):
        return
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start / env_end: fields 50 and 51 of stat(5)
        block = ctypes.string_at(start, end - start)
        needle = f"{name}={JOB_ID_PLACEHOLDER}".encode()
        i = block.find(needle)
        while i > 0 and block[i - 1] != 0:
            i = block.find(needle, i + 1)
        if i >= 0:
            ctypes.memmove(start + i + len(name) + 1, value.encode(), len(value))
    except (OSError, ValueError, IndexError):
        pass  # not Linux: os.environ is still right


if __name__ == "__main__":
    sys.exit(main(sys.argv))
