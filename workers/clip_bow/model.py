"""The dual encoder: image tower, text tower (bag of words or transformer), learnable temperature.

What open_clip supplies here: the transformer blocks of the text tower (``open_clip.transformer.Transformer``)
and the contrastive loss with feature gathering (``loss.py``). What we wrote: the word vocabulary (pseudo-BoW
captions rank whole words, which open_clip's 49k-entry BPE vocabulary does not give), the bag-of-words tower
(``nn.EmbeddingBag``), mean pooling over non-padding tokens (the paper found it as good as a CLS token,
section 4.2) and a 4-layer ConvNet image tower for CPU runs; any registry backbone can replace it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import Transformer  # type: ignore[import-untyped]  # no py.typed marker
from torch import Tensor, nn

from workers.vision.backbones import create_backbone

PAD, UNK = "<pad>", "<unk>"


class Vocab:
    """Word-level vocabulary: id 0 is padding, 1 unknown, then words by decreasing corpus count."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = [PAD, UNK, *[w for w in words if w not in (PAD, UNK)]]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_counts(cls, counts: Counter[str], min_count: int = 1) -> Vocab:
        return cls([w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, batch: Sequence[Sequence[str]], context_length: int) -> Tensor:
        """Token lists -> ``[B, L]`` int64 ids, truncated / padded with 0."""
        out = torch.zeros(len(batch), context_length, dtype=torch.long)
        for i, tokens in enumerate(batch):
            ids = [self.index.get(t, 1) for t in tokens[:context_length]]
            if ids:
                out[i, :len(ids)] = torch.tensor(ids)
        return out


@dataclass(frozen=True)
class TowerConfig:
    image_encoder: str
    text_encoder: str
    vocab_size: int
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    temperature_init: float = 0.07

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConvNet(nn.Module):
    """4 conv layers (32-64-128-256), BN + ReLU, stride 2 from the second, global average pool."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate((32, 64, 128, 256)):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class BowTextEncoder(nn.Module):
    """Mean of word embeddings (``nn.EmbeddingBag``, padding ignored) -> linear projection. Order-free: a
    shuffled caption encodes exactly like the original (section 4.7's pitfall: Shuffle is a no-op here)."""

    def __init__(self, vocab_size: int, width: int, embed_dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, width, mode="mean", padding_idx=0)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.bag.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.bag(ids))


class TransformerTextEncoder(nn.Module):
    """Token + position embeddings -> open_clip ``Transformer`` (bidirectional, padding masked) -> LayerNorm
    -> mean over non-padding tokens -> linear projection."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context_length: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width=width, layers=layers, heads=heads, batch_first=True)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: Tensor) -> Tensor:
        valid = ids != 0
        valid[:, 0] |= ~valid.any(dim=1)  # an empty caption attends to (and pools) its first slot
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        mask = torch.zeros(ids.shape[0], 1, ids.shape[1], dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~valid[:, None, :], float("-inf")).expand(-1, ids.shape[1], -1)
        x = self.transformer(x, attn_mask=mask.repeat_interleave(self.heads, 0))
        x = self.ln_final(x)
        w = valid.to(x.dtype)[..., None]
        return self.proj((x * w).sum(1) / w.sum(1))


class ClipModel(nn.Module):
    """``forward(images, ids)`` -> L2-normalised ``(image_features, text_features)``; ``logit_scale`` is the log
    of the inverse temperature (learnable, starts at log(1 / temperature_init))."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.image_encoder == "convnet":
            self.visual: nn.Module = ConvNet()
            width = self.visual.out_dim
        else:
            backbone = create_backbone(cfg.image_encoder)
            self.visual, width = backbone, backbone.out_dim
        self.visual_proj = nn.Linear(int(width), cfg.embed_dim, bias=False)
        if cfg.text_encoder == "bow":
            self.text: nn.Module = BowTextEncoder(cfg.vocab_size, cfg.text_width, cfg.embed_dim)
        else:
            self.text = TransformerTextEncoder(cfg.vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads,
                                               cfg.context_length, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.visual_proj(self.visual(images)).float(), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        return F.normalize(self.text(ids).float(), dim=-1)

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_image(images), self.encode_text(ids)


@torch.no_grad()
def clamp_logit_scale(model: ClipModel, max_scale: float = 100.0) -> None:
    """CLIP's clamp: the logit scale exp(s) stays in [1, max_scale] (applied after every optimiser step)."""
    model.logit_scale.clamp_(0.0, math.log(max_scale))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices / conv kernels / embeddings; none on gains, biases and
    the logit scale (every parameter with fewer than 2 dimensions, as open_clip's training script)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
