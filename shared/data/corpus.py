"""Text corpora (dataset format ``"text"``): read and validate uploads, hold documents out, load a job's corpus.

An upload is one of

* **JSONL**: one JSON object per line, ``{"text": "..."}`` with an optional ``"topic"`` (ground truth, e.g. the
  source) and an optional ``"split"`` (``"train"`` or ``"test"``); blank lines are skipped, any other key is an
  error (a typo must not silently drop a field);
* **a plain-text archive** (.tar, .tar.gz/.tgz, .zip): every ``.txt`` file is one document, its folder the
  topic: ``[train|test/]<topic>/<name>.txt`` or ``<name>.txt`` at the root (no topic). Archives are read with the
  image archives' safety checks (no links, no ``..``, size limits; ``shared.data.archives``).

Validation stops at the first bad document and names it (``line 12: ...`` / ``entry a/b.txt: ...``), so the API
answers 422 and stores nothing. What is stored is the *canonical* JSONL (``canonical_jsonl``): every record with
its split decided, so every worker sees the same train/test documents.

Held-out documents: a record without a ``split`` is held out when the first 8 bytes of ``sha256(text)`` put it
in the lowest ``HOLDOUT_FRACTION`` - deterministic and per document, so it does not depend on the file's order;
each topic keeps at least one training and (with >= 2 documents) one test document.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.data.base import DatasetError

TEXT_FORMAT = "text"
CORPUS_FILE = "corpus.jsonl"  # the canonical file inside a materialised text dataset's directory
HOLDOUT_FRACTION = 0.2
MAX_DOC_CHARS = 1_000_000
MAX_TOPIC_CHARS = 128
MAX_DOCS = 2_000_000
ALLOWED_KEYS = frozenset({"text", "topic", "split"})
SPLITS = ("train", "test")


class CorpusError(DatasetError):
    """A corpus is rejected; the message names the line or entry and the reason."""


@dataclass
class Corpus:
    """Documents in a fixed order, each with a split and (when known) a ground-truth topic."""

    texts: list[str]
    splits: list[str]
    topics: list[str | None]
    name: str = "corpus"

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.splits) == len(self.topics)):
            raise CorpusError("texts, splits and topics must have one entry per document")

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def subset(self, split: str) -> tuple[list[str], list[str | None]]:
        idx = self.indices(split)
        return [self.texts[i] for i in idx], [self.topics[i] for i in idx]

    @property
    def has_topics(self) -> bool:
        return all(t is not None for t in self.topics)

    @property
    def topic_names(self) -> list[str]:
        return sorted({t for t in self.topics if t is not None})

    def stats(self) -> dict[str, Any]:
        train = self.indices("train")
        topics = Counter(t for t in self.topics if t is not None)
        return {"documents": len(self.texts), "train": len(train), "test": len(self.texts) - len(train),
                "chars": sum(len(t) for t in self.texts), "topics": dict(sorted(topics.items())),
                "num_topics": len(topics), "format": TEXT_FORMAT}


@dataclass
class CorpusReport:
    """What validation found (the dataset's ``stats``)."""

    corpus: Corpus
    source_format: str  # "jsonl" or the archive format
    ignored: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {**self.corpus.stats(), "source_format": self.source_format, "ignored": self.ignored[:20]}


def held_out(text: str, fraction: float = HOLDOUT_FRACTION) -> bool:
    """Whether a document without an explicit split is a test document (a pure function of its text)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def assign_splits(texts: list[str], topics: list[str | None], splits: list[str | None]) -> list[str]:
    """Decide the split of every record that has none (``held_out``), keeping >= 1 train and, with >= 2
    documents, >= 1 test document per topic among the undecided ones."""
    out = [s if s is not None else ("test" if held_out(t) else "train") for t, s in zip(texts, splits, strict=True)]
    by_topic: dict[str | None, list[int]] = {}
    for i, (topic, s) in enumerate(zip(topics, splits, strict=True)):
        if s is None:
            by_topic.setdefault(topic, []).append(i)
    for members in by_topic.values():
        labels = [out[i] for i in members]
        if "train" not in labels:
            out[members[0]] = "train"
        elif "test" not in labels and len(members) >= 2:
            out[members[-1]] = "test"
    return out


def _check_record(rec: Any, where: str) -> tuple[str, str | None, str | None]:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: expected a JSON object like {{\"text\": \"...\"}}, got {type(rec).__name__}")
    extra = sorted(set(rec) - ALLOWED_KEYS)
    if extra:
        raise CorpusError(f"{where}: unknown key(s) {extra}; allowed: text, topic (optional), split (optional)")
    text = rec.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f"{where}: 'text' must be a non-empty string")
    if len(text) > MAX_DOC_CHARS:
        raise CorpusError(f"{where}: the document has {len(text)} characters; at most {MAX_DOC_CHARS} (split it)")
    if "\x00" in text:
        raise CorpusError(f"{where}: the text contains a NUL character")
    topic = rec.get("topic")
    if topic is not None and (not isinstance(topic, str) or not topic.strip() or len(topic) > MAX_TOPIC_CHARS):
        raise CorpusError(f"{where}: 'topic' must be a non-empty string of at most {MAX_TOPIC_CHARS} characters")
    split = rec.get("split")
    if split is not None and split not in SPLITS:
        raise CorpusError(f"{where}: 'split' must be 'train' or 'test', got {str(split)[:20]!r}")
    return text, (topic.strip() if topic is not None else None), split


def _finish(texts: list[str], topics: list[str | None], splits: list[str | None], name: str) -> Corpus:
    if not texts:
        raise CorpusError("the corpus has no documents")
    if len(texts) > MAX_DOCS:
        raise CorpusError(f"the corpus has {len(texts)} documents; at most {MAX_DOCS}")
    has = [t is not None for t in topics]
    if any(has) and not all(has):
        first = has.index(False) if not has[0] else has.index(True)
        raise CorpusError(f"document {first + 1}: either every document has a 'topic' or none has (ground truth "
                          "must be complete to score routing against it)")
    corpus = Corpus(texts, assign_splits(texts, topics, splits), topics, name)
    if not corpus.indices("train"):
        raise CorpusError("every document is in the test split; a corpus needs training documents")
    return corpus


def read_jsonl(data: bytes | str, *, name: str = "corpus") -> Corpus:
    """Parse and validate JSONL text (see the module docstring)."""
    raw = data.decode("utf-8") if isinstance(data, bytes) else data
    texts: list[str] = []
    topics: list[str | None] = []
    splits: list[str | None] = []
    for n, line in enumerate(io.StringIO(raw), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        text, topic, split = _check_record(rec, f"line {n}")
        texts.append(text)
        topics.append(topic)
        splits.append(split)
    return _finish(texts, topics, splits, name)


def read_text_archive(path: Path, *, max_files: int, max_unpacked_bytes: int, name: str = "corpus") -> CorpusReport:
    """Validate a plain-text archive: ``[train|test/]<topic>/<name>.txt`` (or root ``<name>.txt``)."""
    from shared.data.archives import _iter_entries as iter_entries  # the shared safe reader
    from shared.data.archives import detect_format
    from shared.data.layout import ArchiveError, is_junk

    try:
        fmt = detect_format(path)
    except ArchiveError as e:
        raise CorpusError(str(e)) from None
    found: list[tuple[str, str]] = []
    ignored: list[str] = []
    total = 0
    try:
        for entry, open_fn in iter_entries(path, fmt):
            if entry.is_dir:
                continue
            if len(found) + len(ignored) >= max_files:
                raise CorpusError(f"the archive has more than {max_files} files")
            if is_junk(entry.path) or not entry.path.lower().endswith(".txt"):
                ignored.append(entry.path)
                continue
            total += entry.size
            if total > max_unpacked_bytes:
                raise CorpusError(f"the archive unpacks to more than {max_unpacked_bytes} bytes")
            if entry.size > 4 * MAX_DOC_CHARS:
                raise CorpusError(f"entry {entry.path}: {entry.size} bytes; a document has at most "
                                  f"{MAX_DOC_CHARS} characters (split it)")
            with open_fn() as f:
                body = f.read(entry.size + 1)
            try:
                found.append((entry.path, body.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise CorpusError(f"entry {entry.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ArchiveError as e:
        raise CorpusError(str(e)) from None
    texts: list[str] = []
    topics: list[str | None] = []
    splits: list[str | None] = []
    for p, body in sorted(found):
        parts = p.split("/")
        split = parts[0] if parts[0] in SPLITS and len(parts) > 1 else None
        rest = parts[1:] if split else parts
        topic = rest[-2] if len(rest) >= 2 else None
        text, topic, split = _check_record({"text": body, "topic": topic, "split": split}, f"entry {p}")
        texts.append(text)
        topics.append(topic)
        splits.append(split)
    if not texts:
        raise CorpusError("the archive has no .txt documents; expected <topic>/<name>.txt or <name>.txt files")
    return CorpusReport(_finish(texts, topics, splits, name), fmt, ignored)


def read_upload(path: Path, filename: str, *, max_files: int, max_unpacked_bytes: int) -> CorpusReport:
    """Validate an uploaded text corpus (``.jsonl`` by name, else an archive); ``CorpusError`` says why not."""
    if filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        if path.stat().st_size > max_unpacked_bytes:
            raise CorpusError(f"the file is larger than {max_unpacked_bytes} bytes")
        try:
            data = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"the file is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return CorpusReport(read_jsonl(data, name=filename), "jsonl")
    if filename.lower().endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        return read_text_archive(path, max_files=max_files, max_unpacked_bytes=max_unpacked_bytes, name=filename)
    raise CorpusError(f"unsupported text corpus {filename!r}: upload .jsonl, or a .tar/.tar.gz/.tgz/.zip of .txt "
                      "files")


def canonical_jsonl(corpus: Corpus) -> bytes:
    """The stored form: one ``{"text", "topic"?, "split"}`` object per line, in corpus order."""
    lines = []
    for text, topic, split in zip(corpus.texts, corpus.topics, corpus.splits, strict=True):
        rec: dict[str, Any] = {"text": text, "split": split}
        if topic is not None:
            rec["topic"] = topic
        lines.append(json.dumps(rec, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")
