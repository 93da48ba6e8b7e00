"""Child-process entry point: ``python -m workers.runtime.child WORKDIR``.

Runs the job kind's method with a ``JobContext`` and turns the way it ended into an exit code the supervisor
understands (see protocol.py). CUDA is only ever initialised here, never in the Celery worker.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from shared.kinds import ENTRY_POINTS
from workers.runtime.context import JobConfigError, JobContext, Preempted
from workers.runtime.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, RANK0_EXIT_FILE


def _watch_parent(parent: int) -> None:
    """Exit if the supervisor disappears (PDEATHSIG covers Linux; this covers the rest and torchrun ranks)."""
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            os._exit(EXIT_PREEMPTED)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m workers.runtime.child WORKDIR", file=sys.stderr)
        return EXIT_CONFIG
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    ctx = JobContext(Path(argv[1]))
    ctx.install_signal_handlers()
    module_name, _, func_name = ENTRY_POINTS[ctx.kind].partition(":")
    run = getattr(importlib.import_module(module_name), func_name)
    code = _run(run, ctx)
    if ctx.world_size > 1 and ctx.is_main:
        # torchrun exits 1 whenever a rank fails; rank 0's own code (preempted / config error) is what counts.
        (Path(argv[1]) / RANK0_EXIT_FILE).write_text(str(code))
    return code


def _run(run: Callable[[JobContext], None], ctx: JobContext) -> int:
    try:
        run(ctx)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
