"""``builtin://scenes``: procedural captioned scenes for CLIP-style training (deterministic, 48 px).

Every image shows ``count`` (1-3) copies of one object on a grey, noisy background. The object has six
attributes, drawn independently: shape (6), colour (6), size (3), position (the half of the frame the objects
sit in: 4), texture (3) and count (3). Its caption is written from a template with varied wording, word order,
synonyms, plurals, uninformative "distractor" words (``photo``, ``nice``, ``here`` ...) that dominate word
frequencies, and attributes that are sometimes not mentioned; ``MISSING_CAPTION`` of the training images have
no caption at all (``None``).

Held-out combinations: one colour per shape (6 of the 36 shape-colour pairs, each colour once) never occurs in
the training split; the test split holds ONLY those pairs. Zero-shot classification of shape (or colour) on the
test split is therefore a test of composition - the model never saw, e.g., a red star - not a lookup of
memorised image-caption pairs. Test images carry no caption noise (their captions are the clean template
``"<count> <size> <texture> <colour> <shape> <position>"`` for retrieval).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from shared.data.shapes import CLASSES as SHAPE_MASKS

SIZE = 48
NUM_TRAIN = 8000
NUM_TEST = 1200
TRAIN_SEED, TEST_SEED = 20_261_201, 20_261_202
MISSING_CAPTION = 0.1
_SUPERSAMPLE = 2
_NOISE_STD = 5.0

SHAPES = ["circle", "square", "triangle", "diamond", "star", "plus"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225),
    "yellow": (230, 210, 40), "purple": (150, 60, 195), "orange": (245, 140, 25),
}
SIZES = {"small": 3.5, "medium": 5.5, "large": 7.0}  # object radius in output pixels
POSITIONS = ["left", "right", "top", "bottom"]
TEXTURES = ["solid", "striped", "checkered"]
COUNTS = [1, 2, 3]
ATTRIBUTES: dict[str, list[str]] = {
    "shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES), "position": POSITIONS,
    "texture": TEXTURES, "count": [str(c) for c in COUNTS],
}
# Held out of training: shape i with colour HELD_OUT_COLOUR[i] (a permutation: each colour is held out once).
HELD_OUT = {(s, c) for s, c in zip(SHAPES, ["orange", "purple", "red", "yellow", "green", "blue"], strict=True)}

# --- caption vocabulary: the words a class name can appear as (first = the canonical class-name word) -------
SHAPE_WORDS = {"circle": ["circle", "disk", "ball"], "square": ["square", "box", "block"],
               "triangle": ["triangle", "wedge"], "diamond": ["diamond", "rhombus"], "star": ["star"],
               "plus": ["cross", "plus"]}
COLOUR_WORDS = {"red": ["red", "crimson"], "green": ["green", "emerald"], "blue": ["blue", "navy"],
                "yellow": ["yellow", "golden"], "purple": ["purple", "violet"], "orange": ["orange", "amber"]}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "medium": ["medium", "average"],
              "large": ["large", "big", "huge"]}
TEXTURE_WORDS = {"solid": ["solid", "plain"], "striped": ["striped", "stripy"],
                 "checkered": ["checkered", "chequered"]}
POSITION_PHRASES = {"left": ["on the left", "at the left side", "to the left"],
                    "right": ["on the right", "at the right side", "to the right"],
                    "top": ["at the top", "near the top", "up top"],
                    "bottom": ["at the bottom", "near the bottom", "down below"]}
COUNT_WORDS = {1: ["one", "a single", "a"], 2: ["two", "a pair of"], 3: ["three", "a trio of"]}
PREFIXES = ["a photo of", "an image of", "a nice picture of", "here we see", "look at this photo of",
            "this image shows", "a photo showing", "nice photo of", ""]
SUFFIXES = ["", "", "in this photo", "nice", "in the image", "what a nice picture"]


@dataclass(frozen=True)
class Scenes:
    """One split: ``images`` uint8 N x 48 x 48 x 3, ``captions`` (None = uncaptioned), attribute indices."""

    images: np.ndarray
    captions: list[str | None]
    attributes: dict[str, np.ndarray]  # name -> int64 [N] indexing ATTRIBUTES[name]


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("x", "s")) else "s")


def caption_for(attrs: dict[str, str], rng: np.random.Generator, *, clean: bool = False) -> str:
    """A caption of one scene; ``clean``: the canonical words in a fixed order, no distractors."""
    count = int(attrs["count"])
    if clean:
        noun = SHAPE_WORDS[attrs["shape"]][0]
        return " ".join([COUNT_WORDS[count][0], attrs["size"], attrs["texture"], attrs["colour"],
                         noun if count == 1 else _plural(noun), POSITION_PHRASES[attrs["position"]][0]])

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    def mention(p: float) -> bool:
        return bool(rng.random() < p)

    noun = pick(SHAPE_WORDS[attrs["shape"]])
    noun = noun if count == 1 else _plural(noun)
    colour = pick(COLOUR_WORDS[attrs["colour"]]) if mention(0.85) else ""
    size = pick(SIZE_WORDS[attrs["size"]]) if mention(0.7) else ""
    texture = pick(TEXTURE_WORDS[attrs["texture"]]) if mention(0.7) else ""
    where = pick(POSITION_PHRASES[attrs["position"]]) if mention(0.7) else ""
    number = pick(COUNT_WORDS[count]) if count > 1 or mention(0.5) else ""
    form = int(rng.integers(4))
    if form == 0:  # prefix count size texture colour noun position
        words = [pick(PREFIXES), number, size, texture, colour, noun, where]
    elif form == 1:  # count noun position, colour and texture, size
        details = " and ".join(w for w in (colour, texture) if w)
        words = [number, noun, where + ("," if details or size else ""), details, size]
    elif form == 2:  # position there is/are count colour noun
        words = [where, "there", "is" if count == 1 else "are", number, size, colour, noun, texture and
                 f"with a {texture} pattern"]
    else:  # colour noun (size, texture) position suffix
        inner = ", ".join(w for w in (size, texture) if w)
        words = [pick(PREFIXES), colour, noun, f"({inner})" if inner else "", where, pick(SUFFIXES)]
    return " ".join(w for w in words if w).replace(" ,", ",")


def _texture_mask(kind: str, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Where the texture darkens the object's colour (output-pixel coordinates)."""
    if kind == "striped":
        return np.asarray(np.mod(ys, 4.0) < 2.0)
    if kind == "checkered":
        return np.asarray((np.floor(ys / 3.0) + np.floor(xs / 3.0)) % 2 == 0)
    return np.zeros(np.broadcast(ys, xs).shape, dtype=bool)


def _render(rng: np.random.Generator, attrs: dict[str, str]) -> np.ndarray:
    s = SIZE * _SUPERSAMPLE
    grid = (np.arange(s, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    ys, xs = grid[:, None], grid[None, :]
    count, radius = int(attrs["count"]), SIZES[attrs["size"]] * float(rng.uniform(0.92, 1.08))
    # the objects sit in one half of the frame, spread along it
    horizontal = attrs["position"] in ("top", "bottom")
    along = SIZE * (np.arange(count) + 0.5) / count + rng.uniform(-1.0, 1.0, count)
    across = {"left": SIZE * 0.27, "right": SIZE * 0.73, "top": SIZE * 0.27, "bottom": SIZE * 0.73}[attrs["position"]]
    mask_fn, max_rot = SHAPE_MASKS[attrs["shape"]]
    mask = np.zeros((s, s), dtype=bool)
    for a in along:
        cx, cy = (a, across) if horizontal else (across, a)
        cx, cy = cx + rng.uniform(-1.0, 1.0), cy + rng.uniform(-1.0, 1.0)
        theta = np.deg2rad(rng.uniform(-1, 1) * min(max_rot, 20.0))
        dx, dy = xs - cx, ys - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
        v = (dy * np.cos(theta) - dx * np.sin(theta)) / radius
        mask |= mask_fn(u, v, np.full_like(u, radius))
    colour = np.array(COLOURS[attrs["colour"]], dtype=np.float32) * rng.uniform(0.9, 1.1)
    dark = _texture_mask(attrs["texture"], ys, xs)
    fg = np.where(dark[..., None], colour * 0.45, colour)
    bg = np.full(3, rng.uniform(110, 200), dtype=np.float32)
    img_ss = np.where(mask[..., None], fg, bg)
    img = img_ss.reshape(SIZE, 2, SIZE, 2, 3).mean(axis=(1, 3))
    img += _NOISE_STD * rng.standard_normal(img.shape).astype(np.float32)
    return np.asarray(np.clip(np.rint(img), 0, 255), dtype=np.uint8)


def generate(num: int, seed: int, *, held_out: bool, missing: float = MISSING_CAPTION) -> Scenes:
    """``num`` scenes; ``held_out=False``: every shape-colour pair except ``HELD_OUT``; True: only those."""
    rng = np.random.default_rng(seed)
    pairs = sorted(HELD_OUT) if held_out else [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT]
    images = np.empty((num, SIZE, SIZE, 3), dtype=np.uint8)
    idx: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    captions: list[str | None] = []
    for i in range(num):
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        attrs = {"shape": shape, "colour": colour, "size": str(rng.choice(list(SIZES))),
                 "position": str(rng.choice(POSITIONS)), "texture": str(rng.choice(TEXTURES)),
                 "count": str(rng.choice(COUNTS))}
        images[i] = _render(rng, attrs)
        for k, v in attrs.items():
            idx[k].append(ATTRIBUTES[k].index(v))
        text = caption_for(attrs, rng, clean=held_out)
        captions.append(None if not held_out and rng.random() < missing else text)
    return Scenes(images, captions, {k: np.asarray(v, dtype=np.int64) for k, v in idx.items()})


@lru_cache(maxsize=2)
def load_split(split: str) -> Scenes:
    """The fixed ``train`` / ``test`` split (read-only arrays, cached in-process)."""
    if split == "train":
        out = generate(NUM_TRAIN, TRAIN_SEED, held_out=False)
    elif split == "test":
        out = generate(NUM_TEST, TEST_SEED, held_out=True)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out.images.flags.writeable = False
    return out


def load_scenes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """As an ImageDataset's arrays (the label is the shape), for the image-only loaders."""
    tr, te = load_split("train"), load_split("test")
    return tr.images, tr.attributes["shape"], te.images, te.attributes["shape"], list(SHAPES)
