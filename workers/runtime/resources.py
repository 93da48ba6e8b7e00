"""What the kernel says about the worker's memory: out-of-memory kills, from the cgroup's counters.

A child that ends by SIGKILL the supervisor did not send was most likely killed for memory; the cgroup's
``oom_kill`` counter (v2 ``memory.events``, v1 ``memory.oom_control``) going up during the attempt is the
evidence. Without readable counters, a SIGKILL under a cgroup memory limit is taken as OOM too.
"""

from __future__ import annotations

from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _memory_dirs() -> list[Path]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2 unified
            dirs.append(_CGROUP_ROOT / rel)
        elif "memory" in controllers.split(","):
            dirs.append(_CGROUP_ROOT / "memory" / rel)
    return dirs


def oom_kills() -> int | None:
    """The cgroup's OOM-kill count, or None where no counter can be read."""
    for d in _memory_dirs():
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (d / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
    return None


def memory_limited() -> bool:
    for d in _memory_dirs():
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                value = (d / name).read_text().strip()
            except OSError:
                continue
            if value != "max" and int(value) < (1 << 60):
                return True
    return False


def more_ooms(before: int | None) -> bool:
    """Did the kernel kill something for memory since ``before = oom_kills()``?"""
    after = oom_kills()
    if before is None or after is None:
        return memory_limited()
    return after > before
