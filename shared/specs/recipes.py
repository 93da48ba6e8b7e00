"""Dataset-aware SSL recipes: augmentation and schedule presets per dataset family (torch-free).

solo-learn keeps one config per dataset; here one preset per *family* of datasets, picked from the dataset's
metadata (``shared.data``: ``builtin://mnist`` and ``builtin://digits`` are ``digits``, ``builtin://shapes`` is
``shapes``, an uploaded ImageFolder is ``natural``) unless the spec names one (``augment.preset``). Every field of
the preset can be overridden one by one in the spec's ``augment`` block (and ``epochs`` / ``warmup_epochs`` /
``image_size`` at the top level); the spec then carries the fully *resolved* recipe, which is what the job
stores, what MLflow logs as the run's params (``augment.*``) and what the worker builds its views from.

Families and why they differ (ssl.md 1.6 and 7.2 give the MoCo-v2 "natural" recipe):

* ``natural`` - RGB photos (CIFAR-like, uploads): RandomResizedCrop scale (0.2, 1), horizontal flips,
  ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur p=0.5 (only at >= 96 px).
* ``grey`` - grey photos (X-rays, grey uploads): as ``natural`` but brightness/contrast jitter only; saturation,
  hue and grayscale do nothing to a grey image, so they are off rather than silently wasted.
* ``digits`` - handwritten digits, glyphs, text (MNIST, sklearn digits): grey, so brightness/contrast only, and
  NO horizontal flips (a mirrored 2, 3 or 7 is not that digit) and a milder crop (0.5, 1): a 20 % crop of a
  28-px digit is a stroke fragment that matches any digit.
* ``shapes`` - the procedural colour shapes: ``natural`` with a full hue rotation (hue 0.5): every image is one
  random tint, and MoCo-v2's +-0.1 hue would leave the tint as a shortcut (shared/data/shapes.py).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from shared.specs.common import StrictModel

Family = Literal["natural", "grey", "digits", "shapes"]
FAMILIES: tuple[str, ...] = get_args(Family)
GREY_FAMILIES = ("grey", "digits")
BLUR_MIN_SIZE = 96  # a blur tuned for 224 px erases a 32-px image (ssl.md 7.2): presets blur only from 96 px

# Augmentation presets: every field of ``AugmentOptions`` except ``preset``.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "natural": {"crop_scale": [0.2, 1.0], "hflip": True, "color_jitter": [0.4, 0.4, 0.4, 0.1], "jitter_p": 0.8,
                "grayscale_p": 0.2, "blur_p": 0.5},
    "grey": {"crop_scale": [0.2, 1.0], "hflip": True, "color_jitter": [0.4, 0.4, 0.0, 0.0], "jitter_p": 0.8,
             "grayscale_p": 0.0, "blur_p": 0.5},
    "digits": {"crop_scale": [0.5, 1.0], "hflip": False, "color_jitter": [0.4, 0.4, 0.0, 0.0], "jitter_p": 0.8,
               "grayscale_p": 0.0, "blur_p": 0.0},
    "shapes": {"crop_scale": [0.2, 1.0], "hflip": True, "color_jitter": [0.4, 0.4, 0.4, 0.5], "jitter_p": 0.8,
               "grayscale_p": 0.2, "blur_p": 0.0},
}

# Schedule presets: top-level spec fields, used where the spec leaves them unset.
SCHEDULE_PRESETS: dict[str, dict[str, Any]] = {
    "natural": {"epochs": 10, "warmup_epochs": 0, "image_size": 32},
    "grey": {"epochs": 10, "warmup_epochs": 0, "image_size": 32},
    "digits": {"epochs": 10, "warmup_epochs": 0, "image_size": 32},
    "shapes": {"epochs": 10, "warmup_epochs": 0, "image_size": 32},
}


class AugmentOptions(StrictModel):
    """Two-view augmentation recipe. Unset fields come from the preset of the dataset's family (``preset``);
    after validation every field holds the resolved value. Weak views use only the crop and the flip; strong
    views add the colour jitter, grayscale and blur."""

    preset: Literal["auto", "natural", "grey", "digits", "shapes"] = Field(
        "auto", description="'auto': from the dataset's metadata (builtin://mnist and digits -> digits, "
                            "builtin://shapes -> shapes, uploads -> natural); or name a family")
    crop_scale: list[float] | None = Field(
        None, min_length=2, max_length=2, description="RandomResizedCrop area range (lo, hi), 0 < lo <= hi <= 1")
    hflip: bool | None = Field(None, description="random horizontal flips (off for digits and text)")
    color_jitter: list[float] | None = Field(
        None, min_length=4, max_length=4,
        description="strong views' ColorJitter (brightness, contrast, saturation, hue); hue 0.5 = any hue "
                    "rotation; grey families allow only brightness and contrast")
    jitter_p: float | None = Field(None, ge=0, le=1, description="probability of the colour jitter per image")
    grayscale_p: float | None = Field(None, ge=0, le=1, description="RandomGrayscale probability (strong views)")
    blur_p: float | None = Field(
        None, ge=0, le=1, description=f"Gaussian blur probability (strong views); presets blur only at image_size "
                                      f">= {BLUR_MIN_SIZE}")

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"crop_scale {v}: need 0 < lo <= hi <= 1 (fractions of the image area)")
        return v

    @field_validator("color_jitter")
    @classmethod
    def _jitter(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(x < 0 for x in v) or v[3] > 0.5):
            raise ValueError(f"color_jitter {v}: brightness, contrast and saturation must be >= 0 and hue in "
                             "[0, 0.5]")
        return v


def dataset_family(dataset: str) -> str:
    """The family of a spec's dataset reference: from the builtin set's metadata, else ``natural`` (an upload's
    images are only seen by the worker; name ``augment.preset`` for grey or digit-like uploads)."""
    if dataset.startswith("builtin://"):
        from shared.data.builtin import BUILTIN_META

        meta = BUILTIN_META.get(dataset.removeprefix("builtin://"))
        if meta is not None:
            return str(meta["family"])
    return "natural"


def family_of(data: dict[str, Any]) -> str:
    """The family a raw spec dict asks for: ``augment.preset`` unless 'auto', else the dataset's."""
    augment = data.get("augment")
    preset = augment.get("preset", "auto") if isinstance(augment, dict) else getattr(augment, "preset", "auto")
    if isinstance(preset, str) and preset in FAMILIES:  # raw input: any JSON value may be here
        return str(preset)
    return dataset_family(str(data.get("dataset") or "builtin://shapes"))


def schedule_defaults(family: str) -> dict[str, Any]:
    return dict(SCHEDULE_PRESETS[family])


def resolve_augment(options: AugmentOptions, *, family: str, image_size: int) -> AugmentOptions:
    """Fill every unset field from ``family``'s preset (the spec's values win). Raises ``ValueError`` for colour
    operations asked of a grey family (they would do nothing; the message says what to set)."""
    preset = AUGMENT_PRESETS[family]
    values: dict[str, Any] = {}
    for name, default in preset.items():
        given = getattr(options, name)
        if given is not None:
            values[name] = given
        elif name == "blur_p" and image_size < BLUR_MIN_SIZE:
            values[name] = 0.0
        else:
            values[name] = list(default) if isinstance(default, list) else default
    if family in GREY_FAMILIES:
        _, _, sat, hue = values["color_jitter"]
        if sat or hue or values["grayscale_p"]:
            raise ValueError(f"augment: preset {family!r} is for grey images, where saturation, hue and grayscale "
                             f"change nothing (color_jitter {values['color_jitter']}, grayscale_p "
                             f"{values['grayscale_p']}); set them to 0, or use preset 'natural' for colour images")
    return AugmentOptions(preset=family, **values)


def describe(options: AugmentOptions) -> str:
    """One log line of a resolved recipe."""
    o = options
    return (f"augment preset {o.preset}: crop scale {o.crop_scale}, hflip {o.hflip}, color_jitter {o.color_jitter} "
            f"p={o.jitter_p}, grayscale p={o.grayscale_p}, blur p={o.blur_p}")
