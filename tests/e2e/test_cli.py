"""The `crucible` CLI against a real API server: submit (YAML + --set), jobs, logs, cancel, datasets, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, new_project_key

pytestmark = [pytest.mark.integration]


@pytest.fixture
def cli(platform):
    _, token = new_project_key("cli")
    env = {**os.environ, "CRUCIBLE_API_URL": platform.url, "CRUCIBLE_API_KEY": token}

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert (r.returncode == 0) == ok, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    return run


def test_submit_list_logs_cancel(cli, tmp_path):
    spec = tmp_path / "msf.yaml"
    spec.write_text("kind: ssl-train\nmethod: msf\ndataset: builtin://shapes\nlimit_train: 256\nbatch_size: 64\n"
                    "bank_size: 128\nepochs: 1\nexperiment: cli\n")
    out = cli("submit", str(spec), "--set", "priority=7", "--set", "resources.max_runtime_s=600").stdout
    job_id = out.split("job ", 1)[1].split()[0]
    shown = json.loads(cli("show", job_id).stdout)
    assert shown["priority"] == 7 and shown["spec"]["resources"]["max_runtime_s"] == 600
    assert job_id in cli("jobs", "--experiment", "cli").stdout
    assert "[submitted]" in cli("logs", job_id).stdout
    assert "cancelled" in cli("cancel", job_id).stdout
    err = cli("cancel", job_id, ok=False).stderr
    assert err.startswith("error: HTTP 409") and "already ended cancelled" in err


def test_bad_input_gets_a_message_not_a_traceback(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: ssl-train\nbank_size: 100\nbatch_size: 64\nbogus: 1\n")
    err = cli("submit", str(bad), ok=False).stderr
    assert "bank_size: 100 is not a multiple of batch_size=64" in err and "bogus: Extra inputs" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    assert "not valid YAML" in cli("submit", str(broken), ok=False).stderr
    assert "--set expects key=value" in cli("submit", str(bad), "--set", "oops", ok=False).stderr
    assert "unknown worker kind" in cli("worker", "--kind", "gpu-miner", ok=False).stderr


def test_unreachable_api_is_explained(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("kind: ssl-train\n")
    env = {**os.environ, "CRUCIBLE_API_URL": "http://127.0.0.1:9", "CRUCIBLE_API_KEY": "crk_x"}
    r = subprocess.run([sys.executable, "-m", "services.cli.main", "submit", str(spec)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the Crucible API" in r.stderr and "crucible up" in r.stderr


def test_dataset_upload_from_a_directory_and_schema(cli, tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("red", "blue"):
        (tmp_path / "colours" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "colours" / cls / f"{i}.png")
    out = cli("datasets", "upload", str(tmp_path / "colours")).stdout
    assert "dataset colours v1" in out and "10 images, 2 classes" in out
    assert "colours@1" in cli("datasets", "list").stdout
    schema = json.loads(cli("schema", "ssl-train").stdout)
    assert "bank_size" in schema["properties"] and schema["additionalProperties"] is False


def test_pipeline_submit_follow_cancel_and_templates(cli, tmp_path):
    """`crucible pipeline ...` as a researcher uses it: a file with a bad step is a message naming the step and the
    field; a good one is submitted, cancelled, and `follow` prints its tree and exits non-zero; templates list."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  train:\n    kind: ssl-train\n    epochs: 0\n")
    err = cli("pipeline", "submit", str(bad), ok=False).stderr
    assert err.startswith("error: HTTP 422") and "steps.train.epochs" in err
    good = tmp_path / "chain.yaml"
    good.write_text("name: cli-chain\nsteps:\n  train:\n    kind: ssl-train\n    dataset: builtin://shapes\n"
                    "    limit_train: 64\n    batch_size: 32\n    bank_size: 64\n    epochs: 50\n"
                    "  evaluate:\n    kind: eval\n    checkpoint: ${steps.train.checkpoint}\n"
                    "    dataset: builtin://shapes\n")
    out = cli("pipeline", "submit", str(good)).stdout
    assert "(2 steps: train, evaluate)" in out
    pipeline_id = out.split("pipeline ", 1)[1].split()[0]
    shown = json.loads(cli("pipeline", "show", pipeline_id).stdout)
    assert [s["name"] for s in shown["steps"]] == ["train", "evaluate"]
    assert "cancelled" in cli("pipeline", "cancel", pipeline_id).stdout
    followed = cli("pipeline", "follow", pipeline_id, ok=False)
    assert f"pipeline {pipeline_id}: cancelled" in followed.stdout and "└ evaluate (eval)" in followed.stderr
    listed = cli("pipeline", "templates").stdout
    assert "distill-chain:" in listed and "teacher_epochs (default 10)" in listed
    assert "not found" in cli("pipeline", "show", "00000000-0000-0000-0000-000000000000", ok=False).stderr
