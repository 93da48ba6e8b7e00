"""Run every platform benchmark in turn (`make bench`)."""

from __future__ import annotations

import subprocess
import sys

for module in ("bench.platform_overhead", "bench.control_plane", "bench.msf_perf"):
    print(f"\n=== {module} ===", flush=True)
    subprocess.run([sys.executable, "-m", module], check=True)
