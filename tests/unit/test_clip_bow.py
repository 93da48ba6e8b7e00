"""clip-bow-trainer: caption operators, the contrastive loss, the logit-scale clamp, pseudo-caption top-k, prompt
ensembling, retrieval ranks, and the captions file validator (pure functions, tiny tensors)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.data import scenes
from shared.data.captions import CaptionError, parse_captions, validate_archive_captions
from shared.specs.clip import CaptionOps, ClipTrainSpec
from workers.clip_bow import captions as ops
from workers.clip_bow.evaluate import ensemble, ranks, retrieval_metrics, topk_accuracy
from workers.clip_bow.loss import clip_loss, feature_cache_loss
from workers.clip_bow.model import ClipModel, TowerConfig, Vocab, clamp_logit_scale, param_groups
from workers.clip_bow.pseudo import top_k_words

CAPTION = "A photo of two big red boxes, on the left of the photo."


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- caption operators ----------------------------------------------------------------------------------------
def test_tokenize_and_deterministic_operators() -> None:
    tokens = ops.tokenize(CAPTION)
    assert tokens == ["a", "photo", "of", "two", "big", "red", "boxes", ",", "on", "the", "left", "of", "the",
                      "photo", "."]
    assert ops.full(tokens, rng()) == tokens
    words = ops.rm_stop_nalpha(tokens, rng())
    assert words == ["photo", "two", "big", "red", "boxes", "left", "photo"]  # count and place words survive
    assert ops.dedupe(words, rng()) == ["photo", "two", "big", "red", "boxes", "left"]
    assert ops.keep(2, words, rng()) == ["photo", "two"]
    assert ops.rm_top_freq(frozenset({"photo"}), words, rng()) == ["two", "big", "red", "boxes", "left"]
    assert ops.limit_to_vocab(frozenset({"red", "left", "cat"}), words, rng()) == ["red", "left"]


def test_shuffle_is_a_seeded_permutation() -> None:
    words = ["two", "big", "red", "boxes", "left"]
    a, b = ops.shuffle(words, rng(1)), ops.shuffle(words, rng(1))
    assert a == b and sorted(a) == sorted(words)
    assert len({tuple(ops.shuffle(words, rng(s))) for s in range(20)}) > 5  # not a fixed order


def test_balancing_rules() -> None:
    counts = Counter({"photo": 1000, "red": 100, "box": 10, "star": 1})
    assert ops.top_words(counts, 1) == frozenset({"photo"})
    assert ops.top_words(Counter({"b": 2, "a": 2, "c": 1}), 1) == frozenset({"a"})  # ties: alphabetical
    p = ops.metaclip_probs(counts, 10)
    assert p == {"photo": 0.01, "red": 0.1, "box": 1.0, "star": 1.0}
    q = ops.subsample_probs(counts, 1e-2)
    assert q["photo"] == pytest.approx(math.sqrt(1e-2 / (1000 / 1111)))
    assert q["star"] == 1.0
    kept = [len(ops.drop_with_probability({"photo": 0.25}, ["photo"], rng(s))) for s in range(2000)]
    assert np.mean(kept) == pytest.approx(0.25, abs=0.04)


def test_caption_transform_is_resampled_per_epoch_and_replayable() -> None:
    counts = ops.bow_counts([CAPTION, "a red star", "a photo of a star"])
    t = ops.CaptionTransform(CaptionOps(bow=True, balance="top_freq", top_freq=1), counts, seed=3)
    assert t.top == frozenset({"photo"})
    first = t(CAPTION, epoch=1, index=7)
    assert first == t(CAPTION, epoch=1, index=7)  # a pure function of (seed, epoch, index)
    assert sorted(first) == ["big", "boxes", "left", "red", "two"]
    assert len({tuple(t(CAPTION, epoch=e, index=7)) for e in range(1, 20)}) > 3  # resampled every epoch
    assert t.prompt("a photo of a red star.") == ["red", "star"]  # prompts: same operators, no shuffle
    full = ops.CaptionTransform(CaptionOps(), counts)
    assert full(CAPTION, epoch=1, index=0) == ops.tokenize(CAPTION)
    assert full.prompt("a photo of a star.") == ops.tokenize("a photo of a star.")


def test_bow_fraction_picks_a_fixed_share() -> None:
    t = ops.CaptionTransform(CaptionOps(bow=True, bow_fraction=0.3), Counter(), seed=0)
    chosen = [t.is_bow(i) for i in range(2000)]
    assert np.mean(chosen) == pytest.approx(0.3, abs=0.04)
    assert chosen == [t.is_bow(i) for i in range(2000)]


def test_balance_needs_bow() -> None:
    with pytest.raises(ValueError, match="set bow: true"):
        CaptionOps(balance="top_freq")


# --- loss, clamp, optimiser groups ----------------------------------------------------------------------------
def literal_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    n = img.shape[0]
    total = 0.0
    for i in range(n):  # image i against every caption, and caption i against every image
        li = [scale * float(img[i] @ txt[j]) for j in range(n)]
        lt = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -(li[i] - math.log(sum(math.exp(v) for v in li)))
        total += -(lt[i] - math.log(sum(math.exp(v) for v in lt)))
    return total / (2 * n)


def test_clip_loss_matches_the_literal_definition() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    for scale in (1.0, 14.3):
        assert float(clip_loss(img, txt, torch.tensor(scale))) == pytest.approx(literal_clip_loss(img, txt, scale),
                                                                                rel=1e-5)


def tiny_model(text: str = "bow") -> ClipModel:
    torch.manual_seed(0)
    return ClipModel(TowerConfig("convnet", text, vocab_size=12, embed_dim=8, text_width=8, text_layers=1,
                                 text_heads=2, context_length=6))


def test_feature_cache_gradient_equals_the_full_batch_gradient() -> None:
    images = torch.randn(8, 3, 16, 16)
    ids = torch.randint(1, 12, (8, 6))
    grads = []
    for accum in (1, 2):
        model = tiny_model("transformer").eval()  # eval: BatchNorm uses running stats, so chunks do not differ
        if accum == 1:
            img, txt = model(images, ids)
            loss = clip_loss(img, txt, model.logit_scale.exp())
        else:
            loss, true = feature_cache_loss(model, list(images.chunk(2)), list(ids.chunk(2)), model.logit_scale)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        values = float(loss.detach())
        if accum == 2:
            assert values == pytest.approx(float(true))
    assert grads[0].keys() == grads[1].keys() and "logit_scale" in grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_logit_scale_starts_at_1_over_0_07_and_is_clamped() -> None:
    model = tiny_model()
    assert float(model.logit_scale.exp()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    clamp_logit_scale(model, 100.0)
    assert float(model.logit_scale.exp()) == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale) == 0.0


def test_no_weight_decay_on_gains_biases_and_logit_scale() -> None:
    model = tiny_model("transformer")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    off = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in off and any(n.endswith(".bias") for n in off) and any("ln" in n for n in off)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bow_tower_ignores_order_and_transformer_does_not() -> None:
    ids = torch.tensor([[3, 4, 5, 0, 0, 0]])
    rev = torch.tensor([[5, 4, 3, 0, 0, 0]])
    bow, tf = tiny_model("bow"), tiny_model("transformer")
    assert torch.allclose(bow.encode_text(ids), bow.encode_text(rev), atol=1e-6)
    assert not torch.allclose(tf.encode_text(ids), tf.encode_text(rev), atol=1e-4)
    # padding does not change the transformer's features (masked and left out of the mean)
    assert torch.allclose(tf.encode_text(ids[:, :4]), tf.encode_text(ids), atol=1e-5)


def test_vocab_encodes_with_padding_and_unknown() -> None:
    v = Vocab.from_counts(Counter({"red": 3, "box": 5}))
    assert v.words == ["<pad>", "<unk>", "box", "red"]
    assert v.encode([["red", "cat"], []], 3).tolist() == [[3, 1, 0], [0, 0, 0]]


# --- pseudo captions, zero-shot, retrieval -------------------------------------------------------------------
def test_pseudo_caption_top_k_on_a_hand_built_similarity_matrix() -> None:
    words = ["red", "blue", "box", "star"]
    sim = torch.tensor([[0.9, 0.1, 0.5, -0.2],
                        [0.0, 0.3, 0.2, 0.8]])
    assert top_k_words(sim, words, 2) == [["red", "box"], ["star", "blue"]]
    assert top_k_words(sim, words, 3, threshold=0.25) == [["red", "box"], ["star", "blue"]]
    assert top_k_words(sim, words, 10) == [["red", "box", "blue", "star"], ["star", "blue", "box", "red"]]


def test_template_ensemble_averages_normalised_features_and_renormalises() -> None:
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],       # class 0: two templates at right angles
                          [[0.6, 0.8], [0.6, 0.8]]])      # class 1: identical templates
    w = ensemble(feats)
    assert torch.allclose(w[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(w[1], torch.tensor([0.6, 0.8]))
    assert torch.allclose(w.norm(dim=1), torch.ones(2))
    images = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    # cosines: image 0 -> (0.99, 1.0): class 1; image 1 -> (0.71, 0.6): class 0; label -1 is skipped
    assert topk_accuracy(images, w, np.array([1, 0, -1]), ks=(1, 2)) == {1: 1.0, 2: 1.0}
    assert topk_accuracy(images, w, np.array([1, 1, -1]), ks=(1, 2)) == {1: 0.5, 2: 1.0}


def test_retrieval_ranks_and_recall() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0],
                        [0.8, 0.5, 0.1],
                        [0.0, 0.2, 0.1]])
    assert ranks(sim).tolist() == [1, 2, 2]
    eye = torch.eye(4)
    m = retrieval_metrics(eye, eye)
    assert m["i2t_R@1"] == 1.0 and m["t2i_median_rank"] == 1.0
    flipped = retrieval_metrics(eye, eye.flip(0))
    assert flipped["i2t_R@1"] == 0.0 and flipped["i2t_R@5"] == 1.0


# --- captions files and the scenes generator -----------------------------------------------------------------
def jsonl(*rows: object) -> bytes:
    return b"\n".join(json.dumps(r).encode() if not isinstance(r, bytes) else r for r in rows)


def test_captions_file_validation_names_the_line_and_reason() -> None:
    images = {"train/a/1.png", "train/a/2.png"}
    ok = parse_captions(jsonl({"image": "train/a/1.png", "caption": " red box ", "pseudo": True}, b""), images=images)
    assert ok[0].caption == "red box" and ok[0].extra == {"pseudo": True}
    cases = [
        (jsonl({"image": "train/a/1.png", "caption": "x"}, {"image": "train/a/9.png", "caption": "y"}), 2,
         "not in the archive"),
        (jsonl({"image": "train/a/1.png", "caption": "   "}), 1, "is empty"),
        (jsonl({"image": "train/a/1.png", "caption": "x"}, b'{"image": "train/a/2.png", "caption": "\xff"}'), 2,
         "not UTF-8"),
        (b"image,caption\ntrain/a/1.png,red box", 1, "not a JSON object"),
        (jsonl([1, 2]), 1, "expected a JSON object"),
        (jsonl({"image": "train/a/1.png", "caption": "x"}, {"image": "train/a/1.png", "caption": "y"}), 2,
         "captioned twice"),
        (jsonl({"image": "train/a/1.png", "caption": 3}), 1, "must be a string"),
    ]
    for data, line, reason in cases:
        with pytest.raises(CaptionError, match=reason) as e:
            parse_captions(data, images=images)
        assert e.value.line == line and f"line {line}" in str(e.value)


def test_archive_captions_at_the_root_or_below_a_wrapping_folder(tmp_path) -> None:
    def tar(entries: dict[str, bytes]) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as t:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return path

    png = b"not-decoded-here"
    stats = validate_archive_captions(tar({"wrap/a/1.png": png, "wrap/b/2.png": png,
                                           "wrap/captions.jsonl": jsonl({"image": "a/1.png", "caption": "hi"})}))
    assert stats == {"format": "captioned", "captioned": 1, "uncaptioned": 1}
    with pytest.raises(CaptionError, match="missing"):
        validate_archive_captions(tar({"a/1.png": png, "b/2.png": png}))


def test_scenes_hold_out_shape_colour_pairs_and_are_deterministic() -> None:
    train = scenes.generate(300, 5, held_out=False)
    test = scenes.generate(60, 6, held_out=True)
    pair = lambda s, i: (scenes.SHAPES[s.attributes["shape"][i]], list(scenes.COLOURS)[s.attributes["colour"][i]])  # noqa: E731
    assert not {pair(train, i) for i in range(300)} & scenes.HELD_OUT
    assert {pair(test, i) for i in range(60)} <= scenes.HELD_OUT
    assert 0.03 < np.mean([c is None for c in train.captions]) < 0.2  # some captions missing
    assert all(c for c in test.captions)
    again = scenes.generate(300, 5, held_out=False)
    assert np.array_equal(train.images, again.images) and train.captions == again.captions
    assert len({c for c in train.captions if c}) > 250  # varied wording


def test_spec_rejects_accumulation_that_does_not_split_and_uncaptioned_builtins() -> None:
    with pytest.raises(ValueError, match="multiple of accum_freq"):
        ClipTrainSpec(batch_size=10, accum_freq=4)
    with pytest.raises(ValueError, match="has no captions"):
        ClipTrainSpec(dataset="builtin://shapes")
