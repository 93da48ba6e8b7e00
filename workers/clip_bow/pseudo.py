"""``clip-pseudo-caption``: pseudo-BoW captions for uncaptioned images (methods file section 4.4).

1. the base vocabulary V: the BoW words of the model's training captions (after the operators, so top-frequent
   words removed by ``RmTopFreq`` are not offered either: ``LimitToBaseVocab``);
2. every word of V is embedded as a one-word caption by the text tower;
3. every uncaptioned image is embedded and V is ranked by cosine; its top-k words (optionally only those above
   ``threshold``) form its pseudo-BoW caption;
4. the result - every image, real captions kept, pseudo captions marked ``"pseudo": true`` - is written as a
   new captioned dataset (``ctx.save_dataset``, lineage to the model and the source dataset) for the next
   clip-train (pipeline template ``clip-bow-pseudo``).

On ``builtin://scenes`` the word precision against the generator's ground truth is reported
(``pseudo_word_precision``: share of pseudo words that name one of the image's attribute values).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from shared.data import DatasetError
from shared.data.captions import CAPTIONS_FILE, write_captions
from shared.specs.clip import ClipPseudoCaptionSpec
from workers.clip_bow.data import CaptionedData, load_captioned
from workers.clip_bow.evaluate import encode_images, encode_tokens
from workers.clip_bow.train import load_model
from workers.common.context import MethodContext
from workers.common.device import select_device
from workers.runtime.context import JobConfigError


def top_k_words(sim: Tensor, words: Sequence[str], k: int, threshold: float | None = None) -> list[list[str]]:
    """Per row of ``sim`` ([N images, V words]), the k words of largest similarity, best first, optionally only
    those with similarity > ``threshold``."""
    k = min(k, sim.shape[1])
    values, idx = sim.topk(k, dim=1)
    return [[words[j] for v, j in zip(vs.tolist(), js.tolist(), strict=True) if threshold is None or v > threshold]
            for vs, js in zip(values, idx, strict=True)]


def base_vocabulary(counts: dict[str, int], removed: frozenset[str]) -> list[str]:
    return sorted(w for w in counts if w not in removed)


def scene_truth_words(labels: dict[str, np.ndarray], i: int) -> set[str]:
    """Every word a scenes caption may use for image ``i``'s attribute values (synonyms, plurals)."""
    from shared.data import scenes

    out: set[str] = set()
    tables = {"shape": scenes.SHAPE_WORDS, "colour": scenes.COLOUR_WORDS, "size": scenes.SIZE_WORDS,
              "texture": scenes.TEXTURE_WORDS}
    for attr, table in tables.items():
        if attr in labels and labels[attr][i] >= 0:
            for w in table[scenes.ATTRIBUTES[attr][int(labels[attr][i])]]:
                out |= {*w.split(), w + "s", w + "es"}
    if "position" in labels and labels["position"][i] >= 0:
        out |= set(" ".join(scenes.POSITION_PHRASES[scenes.POSITIONS[int(labels["position"][i])]]).split())
    if "count" in labels and labels["count"][i] >= 0:
        out |= set(" ".join(scenes.COUNT_WORDS[scenes.COUNTS[int(labels["count"][i])]]).split())
    return out


def pseudo_caption(spec: ClipPseudoCaptionSpec, state: dict[str, Any], data: CaptionedData, out_dir: Path, *,
                   device: torch.device | None = None) -> dict[str, Any]:
    """Write the pseudo-captioned dataset to ``out_dir``; returns its stats."""
    device = device or select_device()
    model, vocab, transform, meta = load_model(state)
    model.to(device)
    if not transform.ops.bow:
        raise JobConfigError("pseudo-BoW captions need a BoW-trained model (captions.bow: true in its clip-train)")
    fraction = spec.captioned_fraction if "captioned_fraction" in spec.model_fields_set else \
        float(meta.get("captioned_fraction", 1.0))
    data = data.drop_captions(fraction, int(meta["seed"]))
    words = base_vocabulary(meta["counts"], transform.top)
    word_feats = encode_tokens(model, vocab, [[w] for w in words], device=device)
    train = data.train
    missing = [i for i, c in enumerate(train.captions) if not c]
    mean, std = meta["mean"], meta["std"]
    img = encode_images(model, train.images[missing], mean, std, device=device) if missing else None
    pseudo = top_k_words(img @ word_feats.T, words, spec.top_k, spec.threshold) if img is not None else []
    captions = list(train.captions)
    hits = total = 0
    for i, ws in zip(missing, pseudo, strict=True):
        captions[i] = " ".join(ws) if ws else None
        if "shape" in train.labels:
            truth = scene_truth_words(train.labels, i)
            hits += sum(w in truth for w in ws)
            total += len(ws)
    rows = _write_split(out_dir, "train", train, captions, [i in set(missing) for i in range(len(train))], data)
    rows += _write_split(out_dir, "test", data.test, data.test.captions, [False] * len(data.test), data)
    write_captions(out_dir / CAPTIONS_FILE, rows)
    stats: dict[str, Any] = {"format": "captioned", "train": len(train), "test": len(data.test),
                             "captioned": sum(c is not None for c in train.captions),
                             "pseudo_captioned": sum(1 for ws in pseudo if ws), "top_k": spec.top_k,
                             "vocabulary": len(words)}
    if total:
        stats["pseudo_word_precision"] = hits / total
    return stats


def _write_split(root: Path, split: str, part: Any, captions: Sequence[str | None], pseudo: Sequence[bool],
                 data: CaptionedData) -> list[dict[str, Any]]:
    """Images as ``<split>/<class>/<i>.png`` (class: the uploaded class, or a scene's shape) + caption rows."""
    dim = "class" if "class" in part.labels else "shape"
    names = data.label_names[dim]
    rows: list[dict[str, Any]] = []
    for i in range(len(part)):
        rel = f"{split}/{names[int(part.labels[dim][i])]}/{i:06d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(part.images[i]).save(root / rel)
        if captions[i]:
            row: dict[str, Any] = {"image": rel, "caption": captions[i]}
            if pseudo[i]:
                row["pseudo"] = True
            attrs = {k: data.label_names[k][int(v[i])] for k, v in part.labels.items() if k != "class" and v[i] >= 0}
            if attrs:
                row["attributes"] = attrs
            rows.append(row)
    return rows


def run(ctx: MethodContext[ClipPseudoCaptionSpec]) -> None:
    spec = ctx.spec
    ckpt = (ctx.inputs.get("checkpoints") or {}).get("checkpoint") or {}
    if not ckpt.get("path"):
        raise JobConfigError("no checkpoint input: pass checkpoint: job:<id> of a clip-train job")
    state = torch.load(ckpt["path"], map_location="cpu", weights_only=False)
    image_size = int((state.get("clip") or {}).get("image_size", 32))
    ref = ctx.inputs.get("dataset") or {"uri": spec.dataset}
    try:
        data = load_captioned(ref, image_size=image_size, limit_train=spec.limit_train, limit_test=spec.limit_test)
    except DatasetError as e:
        raise JobConfigError(str(e)) from e
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        out = Path(tmp) / "dataset"
        out.mkdir()
        stats = pseudo_caption(spec, state, data, out)
        ctx.log(f"pseudo-captioned {stats['pseudo_captioned']} images (top-{spec.top_k} of {stats['vocabulary']} "
                f"words)" + (f", word precision {stats['pseudo_word_precision']:.3f}"
                             if "pseudo_word_precision" in stats else ""))
        save = getattr(ctx, "save_dataset", None)
        if save is None:
            raise JobConfigError("this context cannot store datasets (ctx.save_dataset)")
        save(out, name=spec.output_name, format="captioned", output="dataset", stats=stats)
    ctx.set_result({k: float(v) for k, v in stats.items() if isinstance(v, int | float)})
