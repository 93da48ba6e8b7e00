"""Zero-shot classification and image<->text retrieval of a trained dual encoder (methods file section 4.5).

Zero-shot: every template is filled with each class name, transformed like the training captions (a BoW model
gets BoW prompts), encoded and L2-normalised; the class's weight is the mean over templates, renormalised (the
CLIP prompt ensemble, as ``open_clip.zero_shot_classifier.build_zero_shot_classifier``, which is written for
open_clip's tokenizer and model and so is not called directly). Predict the class of largest cosine.

Retrieval: cosine similarities between the test images and their captions; the rank of the true partner
(1 = first) gives R@1/5/10 and the median rank, image->text and text->image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workers.clip_bow.captions import CaptionTransform, tokenize
from workers.clip_bow.model import ClipModel, Vocab


def normalise_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def encode_images(model: ClipModel, images: np.ndarray, mean: Sequence[float], std: Sequence[float], *,
                  device: torch.device, batch: int = 512) -> Tensor:
    model.eval()
    out = [model.encode_image(normalise_images(images[i:i + batch], mean, std).to(device)).cpu()
           for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


@torch.no_grad()
def encode_tokens(model: ClipModel, vocab: Vocab, tokens: Sequence[Sequence[str]], *, device: torch.device,
                  batch: int = 1024) -> Tensor:
    model.eval()
    L = model.cfg.context_length
    out = [model.encode_text(vocab.encode(tokens[i:i + batch], L).to(device)).cpu()
           for i in range(0, len(tokens), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


def ensemble(text_features: Tensor) -> Tensor:
    """``[C, T, D]`` normalised prompt features -> ``[C, D]``: mean over templates, renormalised."""
    mean = text_features.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def class_weights(model: ClipModel, vocab: Vocab, transform: CaptionTransform, classnames: Sequence[str],
                  templates: Sequence[str], *, transform_prompts: bool = True,
                  device: torch.device) -> Tensor:
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = [transform.prompt(p) if transform_prompts else tokenize(p) for p in prompts]
    feats = encode_tokens(model, vocab, tokens, device=device)
    return ensemble(feats.view(len(classnames), len(templates), -1))


def topk_accuracy(image_features: Tensor, weights: Tensor, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of images whose label is among the k classes of largest cosine (labels < 0 are skipped)."""
    y = torch.as_tensor(labels)
    keep = y >= 0
    logits = image_features[keep] @ weights.T
    order = logits.argsort(dim=1, descending=True)
    return {k: float((order[:, :min(k, weights.shape[0])] == y[keep, None]).any(1).float().mean())
            for k in ks}


def ranks(sim: Tensor) -> Tensor:
    """1-based rank of the diagonal entry in each row of a square similarity matrix."""
    target = sim.diagonal()[:, None]
    return (sim > target).sum(dim=1) + 1


def retrieval_metrics(image_features: Tensor, text_features: Tensor) -> dict[str, float]:
    sim = image_features @ text_features.T
    out: dict[str, float] = {}
    for name, r in (("i2t", ranks(sim)), ("t2i", ranks(sim.T))):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float((r <= k).float().mean())
        out[f"{name}_median_rank"] = float(r.float().median())
    return out


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    keep = labels >= 0
    np.add.at(m, (labels[keep], pred[keep]), 1)
    return m


def confusion_png(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 1 + 0.5 * len(names)), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(model: ClipModel, vocab: Vocab, transform: CaptionTransform, test: Any, label_names: dict[str, list[str]],
             *, mean: Sequence[float], std: Sequence[float], attributes: Sequence[str], templates: Sequence[str],
             protocols: Sequence[str] = ("zero-shot", "retrieval"), transform_prompts: bool = True,
             device: torch.device, confusion_dir: Path | None = None) -> tuple[dict[str, float], list[Path]]:
    """Metrics on a test ``Split`` (and confusion-matrix images when ``confusion_dir`` is given)."""
    img = encode_images(model, test.images, mean, std, device=device)
    out: dict[str, float] = {}
    images: list[Path] = []
    if "zero-shot" in protocols:
        for attr in attributes:
            if attr not in label_names or attr not in test.labels:
                continue
            w = class_weights(model, vocab, transform, label_names[attr], templates,
                              transform_prompts=transform_prompts, device=device)
            acc = topk_accuracy(img, w, test.labels[attr])
            out[f"zs_{attr}_top1"], out[f"zs_{attr}_top5"] = acc[1], acc[5]
            if confusion_dir is not None:
                pred = (img @ w.T).argmax(1).numpy()
                m = confusion(pred, test.labels[attr], len(label_names[attr]))
                images.append(confusion_png(m, label_names[attr], confusion_dir / f"confusion-{attr}.png",
                                            f"zero-shot {attr}: top-1 {acc[1]:.3f}"))
    if "retrieval" in protocols:
        have = [i for i, c in enumerate(test.captions) if c]
        if have:
            txt = encode_tokens(model, vocab, [transform.prompt(test.captions[i]) if transform_prompts
                                               else tokenize(test.captions[i]) for i in have], device=device)
            out |= retrieval_metrics(img[have], txt)
    return out, images
