"""The ``patchsearch-defense`` comparison table from its four evaluations' results (the eval ``attack`` protocol:
clean accuracy, accuracy on patched images, target-class false positives with / without the trigger, ASR)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

ROWS = (("eval_clean", "clean-data model"), ("eval_poisoned", "poisoned (undefended)"),
        ("eval_defended", "PatchSearch-defended (i-CutMix)"), ("eval_kd", "KD-defended (CompRess)"))
COLUMNS = (("attack_clean_acc", "clean acc", "{:.3f}"), ("attack_patched_acc", "patched acc", "{:.3f}"),
           ("attack_fp_clean", "FP target (clean)", "{:.0f}"), ("attack_fp_patched", "FP target (patched)", "{:.0f}"),
           ("attack_asr", "ASR", "{:.3f}"))


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown rows for the steps present in ``results`` (step name -> that eval job's result); '-' where a
    number is missing (e.g. an eval without the attack protocol)."""
    lines = ["| model | " + " | ".join(c[1] for c in COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for step, label in ROWS:
        if step not in results:
            continue
        r = results[step]
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append(fmt.format(v) if isinstance(v, int | float) and math.isfinite(v) else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
