"""clip-train on the shared loop (tiny scenes, CPU): it learns, resumes, and its checkpoint feeds the pseudo-caption
step, whose dataset loads back as a captioned dataset with real and pseudo captions."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data import scenes
from shared.specs.clip import ClipPseudoCaptionSpec, ClipTrainSpec
from workers.clip_bow.data import CaptionedData, Split, load_captioned, scene_label_names
from workers.clip_bow.evaluate import evaluate
from workers.clip_bow.pseudo import pseudo_caption
from workers.clip_bow.train import Trainer, load_model
from workers.runtime.local import LocalContext


def tiny_scenes(n_train: int = 256, n_test: int = 64) -> CaptionedData:
    def split(s: scenes.Scenes) -> Split:
        return Split(s.images[:, ::2, ::2].copy(), list(s.captions), dict(s.attributes))  # 48 -> 24 px

    return CaptionedData(split(scenes.generate(n_train, 11, held_out=False)),
                         split(scenes.generate(n_test, 12, held_out=True)), scene_label_names(), "tiny")


SPEC = {"image_size": 24, "embed_dim": 32, "text_width": 32, "text_layers": 1, "text_heads": 2,
        "context_length": 16, "batch_size": 32, "epochs": 2, "lr": 2e-3, "warmup_steps": 2, "captioned_fraction": 0.5,
        "captions": {"bow": True, "balance": "top_freq", "top_freq": 2}}


def test_train_resume_pseudo_caption_and_reload(tmp_path) -> None:
    data = tiny_scenes()
    spec = ClipTrainSpec(**SPEC, text_encoder="bow")
    ctx = LocalContext(spec, checkpoint_dir=tmp_path / "ckpt")
    result = Trainer(spec, data, ctx=ctx).fit()
    assert {"zs_shape_top1", "zs_colour_top5", "i2t_R@1", "t2i_median_rank", "logit_scale"} <= set(result)
    losses = [m["epoch_clip_loss"] for _, m in ctx.metrics if "epoch_clip_loss" in m]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert 1.0 <= result["logit_scale"] <= 100.0
    # resume from the epoch-1 checkpoint replays epoch 2 exactly
    state1 = ctx.checkpoint_state(0)
    assert state1["epoch"] == 1
    ctx2 = LocalContext(spec, resume=state1)
    again = Trainer(spec, data, ctx=ctx2).fit()
    assert again["final_loss"] == pytest.approx(result["final_loss"], rel=1e-4)

    final = ctx.checkpoint_state(-1)
    model, vocab, transform, meta = load_model(final)
    assert meta["captioned_fraction"] == 0.5 and transform.ops.bow
    out = tmp_path / "pseudo"
    out.mkdir()
    stats = pseudo_caption(ClipPseudoCaptionSpec(checkpoint="job:00000000-0000-0000-0000-000000000000", top_k=4),
                           final, data, out)
    uncaptioned = sum(c is None for c in data.drop_captions(0.5, spec.seed).train.captions)
    assert stats["pseudo_captioned"] == uncaptioned > 50
    assert 0.0 <= stats["pseudo_word_precision"] <= 1.0
    union = load_captioned({"path": str(out), "name": "pseudo"}, image_size=24)
    assert len(union.train) == 256 and len(union.test) == 64
    assert all(c for c in union.train.captions)  # real + pseudo: every training image has a caption now
    assert sum(union.train.pseudo) == uncaptioned
    assert all(len(c.split()) == 4 for c, p in zip(union.train.captions, union.train.pseudo, strict=True) if p)
    assert set(union.label_names) >= {"class", "shape", "colour"}
    assert np.array_equal(union.test.labels["colour"], data.test.labels["colour"][np.argsort(
        [f"test/{scene_label_names()['shape'][s]}/{i:06d}.png" for i, s in enumerate(data.test.labels['shape'])],
        kind="stable")])

    # and a transformer model trains on the union
    spec_u = ClipTrainSpec(**(SPEC | {"captioned_fraction": 1.0, "epochs": 1}), text_encoder="transformer")
    r = Trainer(spec_u, union, ctx=LocalContext(spec_u)).fit()
    assert "zs_shape_top1" in r
    metrics, images = evaluate(model, vocab, transform, union.test, union.label_names, mean=meta["mean"],
                               std=meta["std"], attributes=["shape", "class"], templates=["a photo of a {}.", "{}"],
                               device=__import__("torch").device("cpu"), confusion_dir=tmp_path)
    assert {"zs_shape_top1", "zs_class_top1"} <= set(metrics) and len(images) == 2 and images[0].stat().st_size > 0
