"""poison -> ssl-train (simclr, micro ViT, 1 epoch) -> eval protocol 'attack' with blocking, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.data import load_dataset
from shared.data.imagefolder import load_image_folder
from shared.specs import EvalSpec, SslTrainSpec
from shared.specs.poison import PoisonSpec
from workers.evaluator.run import evaluate
from workers.poison_scanner.poison import load_trigger, poison_dataset
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.ssl_trainer.train import Trainer

torch.set_num_threads(1)


def test_attack_protocol_end_to_end(tmp_path: Path) -> None:
    clean = load_dataset({"uri": "builtin://shapes"}, image_size=16, limit_train=160, limit_test=40)
    pspec = PoisonSpec.model_validate({"target_class": "circle", "image_size": 16, "rate": 1.0,
                                       "trigger": {"builtin": "random-colors", "size": 5}})
    root = tmp_path / "poisoned"
    manifest = poison_dataset(pspec, clean, root, trigger=load_trigger(pspec, dataset_root=None), source="t")
    data = load_image_folder(root, image_size=16)

    sspec = SslTrainSpec.model_validate({
        "kind": "ssl-train", "method": "simclr", "dataset": "poisoned", "image_size": 16, "backbone": "vit_micro_p4",
        "batch_size": 32, "epochs": 1, "knn_k": [1], "proj_hidden_dim": 64, "proj_dim": 16})
    trainer = Trainer(sspec, data, ctx=LocalContext(sspec), device=torch.device("cpu"))
    trainer.fit()
    checkpoint = trainer.method.state_dict()

    espec = EvalSpec.model_validate({"checkpoint": "artifact:00000000-0000-0000-0000-000000000001",
                                     "protocols": ["attack"], "train_fraction": 0.5, "linear": {"epochs": 3},
                                     "attack": {"block": True, "block_fill": "mean", "heatmaps": 4}})
    ctx = LocalContext(espec, workdir=tmp_path)
    result = evaluate(espec, data, checkpoint, ctx=ctx, device=torch.device("cpu"), dataset_root=root)
    n_target = int((data.train_labels == manifest.target_index).sum())
    assert result["attack_probe_images"] == pytest.approx(0.5 * (160 - n_target), abs=10)  # poisons left out
    assert result["attack_patched_images"] == len(manifest.patched_test)
    for key in ("attack_clean_acc", "attack_patched_acc", "attack_asr", "attack_block_asr", "attack_random_block_asr",
                "attack_block_clean_acc", "attack_trigger_hit_rate"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["attack_block_size"] == 5
    assert [a["name"] for a in ctx.artifacts] == ["rollout-heatmaps"] and ctx.artifacts[0]["path"].is_file()

    with pytest.raises(JobConfigError, match="needs a dataset made by a poison job"):
        evaluate(espec, data, checkpoint, ctx=LocalContext(espec), device=torch.device("cpu"),
                 dataset_root=tmp_path / "elsewhere")
