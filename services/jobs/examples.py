"""OpenAPI examples for job submission: the YAML specs in shared/specs/examples (the same files the README and
the CLI use), so docs and examples cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "shared" / "specs" / "examples"


def load_examples() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        text = path.read_text()
        summary = text.splitlines()[0].lstrip("# ").strip()
        out[path.stem] = {"summary": summary, "value": yaml.safe_load(text)}
    return out


SUBMIT_EXAMPLES = load_examples()
