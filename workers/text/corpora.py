"""The built-in text corpus ``builtin://multidomain`` (real text from installed packages) and ``load_corpus``.

Four sources, the source being the ground-truth topic (MoIN's experts should find them without being told):

* ``news``     - gensim's Lee background corpus (300 Australian news articles; one passage per article);
* ``wiki``     - gensim's shortened English Wikipedia dump (wiki markup stripped by gensim's ``filter_wiki``);
* ``pydoc``    - docstrings of a fixed list of Python standard-library modules (module, classes, functions);
* ``licenses`` - paragraphs of the license files installed in site-packages (and Python's own LICENSE).

Every document is a passage of ``MIN_CHARS``-``MAX_CHARS`` characters cut at sentence ends (short contexts for a
135M LM on two cores). ``DOCS_PER_TOPIC`` documents per topic, ``TEST_PER_TOPIC`` of them held out. Documents are
held out by *group* (a news article, a Wikipedia page, a module, a license paragraph), so no test passage comes
from an article a training passage came from. The result is a pure function of the installed packages (the
same wheels give the same corpus) and is cached as JSONL (``CRUCIBLE_DATA_CACHE_DIR/text``).

Template-generated text was avoided on purpose: it is trivially predictable and would flatter any adapter.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import importlib
import inspect
import os
import re
import site
import sys
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shared.data.corpus import CORPUS_FILE, Corpus, CorpusError, canonical_jsonl, read_jsonl

MIN_CHARS, MAX_CHARS = 200, 600
DOCS_PER_TOPIC, TEST_PER_TOPIC = 200, 40
TEST_EVERY = 5  # every 5th group (in sorted order) is a test group
TOPICS = ("news", "wiki", "pydoc", "licenses")
PYDOC_MODULES = (
    "argparse", "asyncio.tasks", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest.case",
    "urllib.parse", "uuid", "zipfile",
)
BUILTIN_CORPORA = {"multidomain": "news, Wikipedia, Python docstrings and license texts (4 topics, 800 documents)"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def passages(text: str, *, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Whitespace-normalised passages of at most ``max_chars`` cut at sentence ends; shorter than ``min_chars``
    are dropped (a sentence longer than ``max_chars`` is cut at a word boundary)."""
    out: list[str] = []
    cur = ""
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > min_chars else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if cur and len(cur) + 1 + len(sentence) > max_chars:
            out.append(cur)
            cur = sentence
        else:
            cur = f"{cur} {sentence}".strip()
    if cur:
        out.append(cur)
    return [p for p in out if len(p) >= min_chars]


def _gensim_file(name: str) -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise CorpusError("builtin://multidomain needs gensim (pip install gensim==4.4.0)") from e
    path: str = datapath(name)
    if not os.path.isfile(path):
        raise CorpusError(f"the installed gensim has no test file {name}; reinstall gensim==4.4.0")
    return path


def news_groups() -> list[tuple[str, list[str]]]:
    with open(_gensim_file("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        articles = [line for line in f if line.strip()]
    return [(f"lee-{i:03d}", passages(a)[:1]) for i, a in enumerate(articles)]


def wiki_groups() -> list[tuple[str, list[str]]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    out = []
    with bz2.open(path) as f:
        for title, text, pageid in extract_pages(f):
            clean = filter_wiki(text).replace("'''", "").replace("''", '"')
            paras = [p for block in clean.split("\n\n") if len(block.strip()) >= MIN_CHARS
                     and not block.lstrip().startswith(("|", "{", "!")) for p in passages(block)]
            if paras:
                out.append((f"wiki-{pageid}-{title}", paras))
    return out


def pydoc_groups() -> list[tuple[str, list[str]]]:
    out = []
    for name in PYDOC_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                             if not a.startswith("_") and inspect.isfunction(m)]
        paras = [p for d in docs for p in passages(d)]
        if paras:
            out.append((f"pydoc-{name}", paras))
    return out


def license_groups() -> list[tuple[str, list[str]]]:
    roots = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    files: set[str] = set()
    for root in roots:
        for pattern in ("*/LICENSE*", "*/licenses/LICENSE*", "*/COPYING*", "*/licenses/*"):
            files.update(glob.glob(os.path.join(root, pattern)))
    py_license = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "LICENSE.txt"
    if py_license.is_file():
        files.add(str(py_license))
    seen: set[str] = set()
    for f in sorted(files):
        try:
            text = Path(f).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for block in re.split(r"\n\s*\n", text):
            seen.update(passages(block))
    # one group per distinct paragraph (the same MIT paragraph in fifty packages is one document)
    return [(hashlib.sha256(p.encode()).hexdigest()[:16], [p]) for p in sorted(seen)]


SOURCES: dict[str, Callable[[], list[tuple[str, list[str]]]]] = {
    "news": news_groups, "wiki": wiki_groups, "pydoc": pydoc_groups, "licenses": license_groups,
}


def pick(groups: Iterable[tuple[str, list[str]]], *, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """``n_train`` training and ``n_test`` test passages: groups sorted by key, every ``TEST_EVERY``-th group is a
    test group; passages are taken round-robin over the groups of each split (the first passage of every
    group, then the second, ...), so the documents spread over as many articles as possible."""
    ordered = sorted(groups)
    train = [g for i, (_, g) in enumerate(ordered) if i % TEST_EVERY != TEST_EVERY - 1]
    test = [g for i, (_, g) in enumerate(ordered) if i % TEST_EVERY == TEST_EVERY - 1]

    def take(gs: list[list[str]], n: int, what: str) -> list[str]:
        out: list[str] = []
        depth = 0
        while len(out) < n and any(len(g) > depth for g in gs):
            out += [g[depth] for g in gs if len(g) > depth][: n - len(out)]
            depth += 1
        if len(out) < n:
            raise CorpusError(f"only {len(out)} {what} passages available, {n} needed")
        return out

    return take(train, n_train, "training"), take(test, n_test, "test")


def build_multidomain(docs_per_topic: int = DOCS_PER_TOPIC, test_per_topic: int = TEST_PER_TOPIC) -> Corpus:
    """Build the corpus (topics interleaved, so any prefix of the document list is mixed)."""
    per_topic: dict[str, tuple[list[str], list[str]]] = {}
    for topic in TOPICS:
        try:
            per_topic[topic] = pick(SOURCES[topic](), n_train=docs_per_topic - test_per_topic, n_test=test_per_topic)
        except CorpusError as e:
            raise CorpusError(f"builtin://multidomain, topic {topic!r}: {e}") from None
    texts: list[str] = []
    splits: list[str] = []
    topics: list[str | None] = []
    for split, part in (("train", 0), ("test", 1)):
        n = len(per_topic[TOPICS[0]][part])
        for i in range(n):
            for topic in TOPICS:
                texts.append(per_topic[topic][part][i])
                splits.append(split)
                topics.append(topic)
    return Corpus(texts, splits, topics, "multidomain")


def load_builtin_corpus(name: str) -> Corpus:
    """``builtin://<name>`` as a Corpus, from the local cache when it was built before."""
    if name not in BUILTIN_CORPORA:
        raise CorpusError(f"unknown builtin text corpus {name!r}; choose one of: {', '.join(BUILTIN_CORPORA)}")
    from shared.config import get_settings

    settings = get_settings()
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    path = settings.data_cache_dir / "text" / f"{name}-{code}.jsonl"
    if settings.LOCAL_CACHE and path.is_file():
        return read_jsonl(path.read_text("utf-8"), name=name)
    corpus = build_multidomain()
    if settings.LOCAL_CACHE:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.part")
            tmp.write_bytes(canonical_jsonl(corpus))
            os.replace(tmp, path)
        except OSError:
            pass
    return corpus


def load_corpus(ref: dict[str, Any]) -> Corpus:
    """A job's text dataset input: ``{"uri": "builtin://<name>"}``, or ``{"path": dir}`` holding ``corpus.jsonl``
    (what the worker materialised from an uploaded text dataset)."""
    if ref.get("path"):
        p = Path(ref["path"])
        f = p / CORPUS_FILE if p.is_dir() else p
        if not f.is_file():
            raise CorpusError(f"dataset {ref.get('name') or ref.get('uri')} has no {CORPUS_FILE}: is it a text "
                              "dataset (uploaded with format=text)?")
        return read_jsonl(f.read_text("utf-8"), name=str(ref.get("name") or ref.get("uri") or "corpus"))
    uri = str(ref.get("uri", ""))
    if uri.startswith("builtin://"):
        return load_builtin_corpus(uri.removeprefix("builtin://"))
    raise CorpusError(f"text dataset input {ref!r} has neither a builtin:// uri nor a 'path'")
