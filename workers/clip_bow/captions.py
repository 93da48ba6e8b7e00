"""Caption operators of "A Fistful of Words" (section 4.3): small pure functions on token lists, composable.

An operator maps ``(tokens, rng) -> tokens``; random ones draw only from ``rng``, so a caption's transform is a
pure function of (seed, epoch, caption index) - resampled every epoch, replayed exactly on resume:

* ``full`` - the caption as tokenised (identity);
* ``rm_stop_nalpha`` - drop stop words (``STOP_WORDS``, one fixed list, section 4.7) and non-alphabetic tokens;
* ``dedupe`` - keep the first occurrence of each word;
* ``shuffle`` - a random permutation (removes syntax: the caption becomes a bag of words);
* ``rm_top_freq(t, counts)`` - drop the t most frequent words of the training corpus (the paper's word
  balancing, per the summary; the faithful default);
* ``subsample(theta, freqs)`` - word2vec-style: keep w with probability ``min(1, sqrt(theta / f(w)))``, f the
  relative frequency of w among the corpus's BoW words (an option; the paper's exact rule is unverified);
* ``metaclip_balance(t, counts)`` - MetaCLIP-style: keep w with probability ``min(1, t / count(w))``;
* ``keep(n)`` - the first n words (after ``shuffle``: n random words);
* ``limit_to_vocab(vocab)`` - drop words outside a base vocabulary (``LimitToBaseVocab``).

A BoW caption is ``rm_stop_nalpha -> dedupe -> shuffle`` [-> balancing] [-> keep]. ``CaptionTransform`` builds
the chain from a spec's ``CaptionOps`` and applies it to a fixed share r of the captions; zero-shot prompts go
through the same chain with ``deterministic=True`` (no shuffle, no random drop; RmTopFreq still applies).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from shared.specs.clip import CaptionOps

Op = Callable[[list[str], np.random.Generator], list[str]]

# One fixed English stop-word list (a core of NLTK's), chosen so that count words ("one", "two", "three") and
# spatial words ("top", "bottom", "left") are NOT stop words: sklearn's list drops them, which would erase
# attributes of the captions.
STOP_WORDS = frozenset("""
a an the of and or but if then than so to in on at by for from with without into onto over under above below
up down off out is are was were be been being am do does did have has had having this that these those there
here it its it's i me my we our you your he she him her they them their what which who whom as such not no
nor very can will just too also
""".split())
_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case words, numbers and single punctuation marks: ``"A red, big box."`` ->
    ``["a", "red", ",", "big", "box", "."]``."""
    return _TOKEN_RE.findall(text.lower())


def full(tokens: list[str], rng: np.random.Generator) -> list[str]:
    return list(tokens)


def rm_stop_nalpha(tokens: list[str], rng: np.random.Generator) -> list[str]:
    return [t for t in tokens if t.isalpha() and t not in STOP_WORDS]


def dedupe(tokens: list[str], rng: np.random.Generator) -> list[str]:
    return list(dict.fromkeys(tokens))


def shuffle(tokens: list[str], rng: np.random.Generator) -> list[str]:
    return [tokens[i] for i in rng.permutation(len(tokens))]


def keep(n: int, tokens: list[str], rng: np.random.Generator) -> list[str]:
    return tokens[:n]


def rm_top_freq(top: frozenset[str], tokens: list[str], rng: np.random.Generator) -> list[str]:
    return [t for t in tokens if t not in top]


def drop_with_probability(keep_p: dict[str, float], tokens: list[str], rng: np.random.Generator) -> list[str]:
    """Keep each token with its probability (1 for words not listed); one uniform draw per token."""
    draws = rng.random(len(tokens))
    return [t for t, u in zip(tokens, draws, strict=True) if u < keep_p.get(t, 1.0)]


def limit_to_vocab(vocab: frozenset[str], tokens: list[str], rng: np.random.Generator) -> list[str]:
    return [t for t in tokens if t in vocab]


def top_words(counts: Counter[str], t: int) -> frozenset[str]:
    """The t most frequent words (ties broken alphabetically, so the set is deterministic)."""
    return frozenset(w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:t])


def subsample_probs(counts: Counter[str], theta: float) -> dict[str, float]:
    """word2vec: keep p(w) = min(1, sqrt(theta / f(w))), f(w) = count(w) / total."""
    total = sum(counts.values()) or 1
    return {w: min(1.0, math.sqrt(theta / (c / total))) for w, c in counts.items()}


def metaclip_probs(counts: Counter[str], t: int) -> dict[str, float]:
    """MetaCLIP: keep p(w) = min(1, t / count(w))."""
    return {w: min(1.0, t / c) for w, c in counts.items()}


def compose(ops: Sequence[Op]) -> Op:
    def chain(tokens: list[str], rng: np.random.Generator) -> list[str]:
        for op in ops:
            tokens = op(tokens, rng)
        return tokens

    return chain


def bow_counts(captions: Iterable[str | None]) -> Counter[str]:
    """Corpus word counts after ``rm_stop_nalpha`` and ``dedupe`` (document frequency: once per caption)."""
    rng = np.random.default_rng(0)  # unused by these two operators
    counts: Counter[str] = Counter()
    for c in captions:
        if c:
            counts.update(dedupe(rm_stop_nalpha(tokenize(c), rng), rng))
    return counts


def caption_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, 0xC11B])


@dataclass
class CaptionTransform:
    """The spec's operator chain over a corpus; ``counts`` are the corpus's BoW word counts."""

    ops: CaptionOps
    counts: Counter[str]
    seed: int = 0

    def __post_init__(self) -> None:
        o = self.ops
        self.top = top_words(self.counts, o.top_freq) if o.balance == "top_freq" else frozenset()
        self.keep_p: dict[str, float] = {}
        if o.balance == "subsample":
            self.keep_p = subsample_probs(self.counts, o.subsample_theta)
        elif o.balance == "metaclip":
            self.keep_p = metaclip_probs(self.counts, o.metaclip_t)

    def chain(self, *, deterministic: bool = False) -> Op:
        """The BoW chain (``deterministic``: for prompts - no shuffle, no probabilistic drop, no Keep)."""
        o = self.ops
        ops: list[Op] = [rm_stop_nalpha, dedupe]
        if not deterministic:
            ops.append(shuffle)
        if o.balance == "top_freq":
            ops.append(partial(rm_top_freq, self.top))
        elif self.keep_p and not deterministic:
            ops.append(partial(drop_with_probability, self.keep_p))
        if o.keep is not None and not deterministic:
            ops.append(partial(keep, o.keep))
        return compose(ops)

    def is_bow(self, index: int) -> bool:
        """Whether caption ``index`` is a BoW caption (a fixed share r, chosen by the seed)."""
        if not self.ops.bow:
            return False
        r = self.ops.bow_fraction
        return r >= 1.0 or np.random.default_rng([self.seed, index, 0xB0B]).random() < r

    def __call__(self, caption: str, *, epoch: int, index: int) -> list[str]:
        tokens = tokenize(caption)
        if not self.is_bow(index):
            return tokens
        out = self.chain()(tokens, caption_rng(self.seed, epoch, index))
        # balancing may drop every word; fall back to the unbalanced BoW rather than an empty caption
        return out or compose([rm_stop_nalpha, dedupe])(tokens, caption_rng(self.seed, epoch, index)) or tokens

    def prompt(self, text: str) -> list[str]:
        """A zero-shot prompt, transformed like a BoW training caption when the model was trained on BoW."""
        tokens = tokenize(text)
        if not self.ops.bow:
            return tokens
        out = self.chain(deterministic=True)(tokens, np.random.default_rng(0))
        return out or rm_stop_nalpha(tokens, np.random.default_rng(0)) or tokens
