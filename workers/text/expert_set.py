"""The expert set: the one home of its on-disk format, its validation and the routing function (MoIN §5).

An expert set (methods/security-clip-experts.md §5.1–5.4) is what the ``expert-train`` pipeline produces and the
router serves: a frozen base model reference, the embedder the documents were clustered with, the topic
centroids (the router's index) and one LoRA adapter per topic. On disk it is a directory, stored as an artifact
of kind ``"expert-set"`` (a tar of that directory, :func:`pack` / :func:`unpack`)::

    expert_set.json        the manifest (:class:`ExpertSetManifest`)
    centroids.npy          K x d float32, L2-normalised rows; row ``experts[i].cluster`` is expert i's topic
    adapters/<id>/         a peft adapter directory per expert (adapter_config.json + adapter_model.safetensors)
    ...                    anything the embedder needs (e.g. a fitted TF-IDF+SVD), named in ``embedder``

Routing (§5.2 "router": sequence-level, top-1 nearest centroid, no learned gate) is :func:`route`; both the
routing evaluation and the router replicas call it, so they cannot disagree. Its confidence is the cosine margin
between the two nearest centroids (§5.6); the router falls back to the frozen base below ``fallback_margin``.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST = "expert_set.json"
ARTIFACT_KIND = "expert-set"
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# The margin reported when the set has a single centroid: no runner-up, so the widest gap cosines allow.
SINGLE_CENTROID_MARGIN = 2.0
_NORM_TOL = 1e-3


class ExpertSetError(ValueError):
    """A malformed expert set, or one that does not fit its base model. ``expert`` names the culprit if any."""

    def __init__(self, message: str, *, expert: str | None = None) -> None:
        self.expert = expert
        super().__init__(f"expert {expert!r}: {message}" if expert else message)


class BaseModelRef(BaseModel):
    """The frozen base: ``"smollm2-135m"`` (the packaged SmolLM2), a Hugging Face directory, or ``s3://b/prefix``."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1)
    sha256: str | None = None
    hidden_size: int | None = Field(default=None, ge=1)  # checked against the loaded base when given


class EmbedderSpec(BaseModel):
    """How documents were embedded for clustering, hence how queries must be embedded for routing.

    ``minilm``: all-MiniLM-L6-v2 (sentence-transformers; ``model`` may override the packaged path);
    ``base-mean``: the base model's mean-pooled last hidden state; ``tfidf-svd``: a fitted TF-IDF + SVD whose
    pickle lies at ``path`` inside the set. Kind-specific parameters are kept as extra fields.
    """

    model_config = ConfigDict(extra="allow")

    kind: Literal["minilm", "base-mean", "tfidf-svd"]
    dim: int | None = Field(default=None, ge=1)
    model: str | None = None
    path: str | None = None
    max_length: int | None = Field(default=None, ge=1)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return None if v is None else _check_relative(v, "embedder.path")


class ExpertEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    cluster: int = Field(ge=0)
    adapter: str
    size: int = Field(ge=0)  # documents in the cluster
    topic_purity: float | None = Field(default=None, ge=0.0, le=1.0)
    topic: str | None = None  # the cluster's majority ground-truth topic, when the corpus has one

    @field_validator("adapter")
    @classmethod
    def _relative(cls, v: str) -> str:
        return _check_relative(v, "adapter")


class ExpertSetManifest(BaseModel):
    """``expert_set.json``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    name: str = Field(min_length=1)
    base_model: BaseModelRef
    embedder: EmbedderSpec
    centroids: str = "centroids.npy"
    experts: list[ExpertEntry]
    fallback_margin: float = Field(default=0.0, ge=0.0, le=SINGLE_CENTROID_MARGIN)

    @field_validator("centroids")
    @classmethod
    def _relative(cls, v: str) -> str:
        return _check_relative(v, "centroids")

    @model_validator(mode="after")
    def _consistent(self) -> ExpertSetManifest:
        if not self.experts:
            raise ValueError("experts is empty: an expert set needs at least one expert (were all clusters "
                             "merged away or empty?)")
        for attr in ("id", "cluster"):
            seen: set[object] = set()
            for e in self.experts:
                if getattr(e, attr) in seen:
                    raise ValueError(f"experts: {attr} {getattr(e, attr)!r} appears twice")
                seen.add(getattr(e, attr))
        k = len(self.experts)
        bad = [e.id for e in self.experts if e.cluster >= k]
        if bad:
            raise ValueError(f"experts {bad}: cluster must be a centroid row in 0..{k - 1}")
        return self


def _check_relative(v: str, field: str) -> str:
    p = Path(v)
    if p.is_absolute() or ".." in p.parts or not v:
        raise ValueError(f"{field} must be a relative path inside the expert set, got {v!r}")
    return v


@dataclass
class ExpertSet:
    """A loaded, validated expert set. ``centroids[i]`` is the centroid of ``manifest.experts[i]``."""

    root: Path
    manifest: ExpertSetManifest
    centroids: np.ndarray  # [K, d] float32, unit rows, re-ordered so row i belongs to experts[i]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def expert_ids(self) -> list[str]:
        return [e.id for e in self.manifest.experts]

    def expert(self, expert_id: str) -> ExpertEntry:
        for e in self.manifest.experts:
            if e.id == expert_id:
                return e
        raise ExpertSetError(f"expert set {self.name!r} has no expert {expert_id!r}; it has {self.expert_ids}")

    def adapter_dir(self, expert_id: str) -> Path:
        return self.root / self.expert(expert_id).adapter

    def route(self, query_vectors: Any) -> tuple[list[str], np.ndarray]:
        """Expert ids and cosine margins of ``query_vectors`` (see :func:`route`)."""
        idx, margin = route(query_vectors, self.centroids)
        ids = self.expert_ids
        return [ids[i] for i in idx], margin


def route(query_vectors: Any, centroids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine, and the margin between the top two: ``(indices [Q] int64, margins [Q] f32)``.

    MoIN's router (§5.2): embed the query with the clustering embedder, take the nearest topic centroid, top-1.
    Rows of both inputs are L2-normalised here, so any scale works; a zero query vector routes to centroid 0
    with margin 0 (it always falls back). With one centroid the margin is ``SINGLE_CENTROID_MARGIN``. Exact
    (a matrix product): K is in the thousands at most (§5.2 MoIN-5k), where this beats building an index.
    """
    q = np.atleast_2d(np.asarray(query_vectors, dtype=np.float32))
    c = np.atleast_2d(np.asarray(centroids, dtype=np.float32))
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"query vectors {q.shape} and centroids {c.shape} must be [Q, d] and [K, d]")
    if c.shape[0] == 0:
        raise ValueError("route needs at least one centroid")
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    zero = qn[:, 0] == 0
    q = (q / np.where(qn == 0, 1.0, qn)).astype(np.float32)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    sims = q @ c.T  # [Q, K]
    top = np.argmax(sims, axis=1).astype(np.int64)
    if c.shape[0] == 1:
        margin = np.full(len(q), SINGLE_CENTROID_MARGIN, dtype=np.float32)
    else:
        two = -np.partition(-sims, 1, axis=1)[:, :2]
        margin = (two[:, 0] - two[:, 1]).astype(np.float32)
    margin[zero] = 0.0
    top[zero] = 0
    return top, margin


# --- load / save ----------------------------------------------------------------------------------------
def load(directory: str | Path) -> ExpertSet:
    """Read and validate an expert set directory (manifest, centroids, adapter files).

    Raises :class:`ExpertSetError` naming the file, field or expert at fault. Adapters are checked against the
    base model separately (:func:`check_against_base`), since that needs the model loaded.
    """
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ExpertSetError(f"{root} is not an expert set: it has no {MANIFEST}")
    try:
        manifest = ExpertSetManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise ExpertSetError(f"{path}: {errs}") from None
    cpath = root / manifest.centroids
    if not cpath.is_file():
        raise ExpertSetError(f"{path}: centroids file {manifest.centroids!r} is missing")
    raw = np.load(cpath, allow_pickle=False)
    k = len(manifest.experts)
    if raw.ndim != 2 or raw.shape[0] != k:
        raise ExpertSetError(f"{cpath}: {k} experts need a [{k}, d] centroid table, got shape {raw.shape}")
    if not np.isfinite(raw).all():
        raise ExpertSetError(f"{cpath}: centroids contain NaN or inf")
    norms = np.linalg.norm(raw, axis=1)
    if np.abs(norms - 1.0).max() > _NORM_TOL:
        raise ExpertSetError(f"{cpath}: centroid rows must be L2-normalised (norms {norms.min():.4f}.."
                             f"{norms.max():.4f}); save() normalises them")
    if manifest.embedder.dim is not None and raw.shape[1] != manifest.embedder.dim:
        raise ExpertSetError(f"{cpath}: centroids are {raw.shape[1]}-d but embedder.dim is {manifest.embedder.dim}")
    if manifest.embedder.path is not None and not (root / manifest.embedder.path).exists():
        raise ExpertSetError(f"{path}: embedder.path {manifest.embedder.path!r} is missing")
    for e in manifest.experts:
        adir = root / e.adapter
        if not (adir / "adapter_config.json").is_file():
            raise ExpertSetError(f"adapter directory {e.adapter!r} has no adapter_config.json", expert=e.id)
        if not any((adir / w).is_file() for w in ADAPTER_WEIGHTS):
            raise ExpertSetError(f"adapter directory {e.adapter!r} has no {' or '.join(ADAPTER_WEIGHTS)}",
                                 expert=e.id)
    centroids = np.ascontiguousarray(raw[[e.cluster for e in manifest.experts]], dtype=np.float32)
    return ExpertSet(root=root, manifest=manifest, centroids=centroids)


def save(directory: str | Path, *, name: str, base_model: BaseModelRef | Mapping[str, Any],
         embedder: EmbedderSpec | Mapping[str, Any], centroids: Any, experts: Sequence[ExpertEntry | Mapping[str, Any]],
         fallback_margin: float = 0.0, adapter_sources: Mapping[str, str | Path] | None = None) -> ExpertSet:
    """Write an expert set into ``directory`` and return it loaded (so a bad one fails here, not at serving).

    ``centroids`` is the K x d table indexed by ``experts[i].cluster`` (rows are L2-normalised on the way in).
    ``adapter_sources`` maps expert id → a peft adapter directory to copy to that expert's ``adapter`` path;
    experts without one must already have their adapter in place.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    try:
        manifest = ExpertSetManifest(name=name, base_model=BaseModelRef.model_validate(base_model),
                                     embedder=EmbedderSpec.model_validate(embedder),
                                     experts=[ExpertEntry.model_validate(e) for e in experts],
                                     fallback_margin=fallback_margin)
    except ValidationError as exc:
        raise ExpertSetError(f"expert set {name!r}: {exc}") from None
    c = np.asarray(centroids, dtype=np.float32)
    if c.ndim != 2:
        raise ExpertSetError(f"centroids must be a [K, d] table, got shape {c.shape}")
    c = (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    np.save(root / manifest.centroids, c)
    for expert_id, src in (adapter_sources or {}).items():
        entry = next((e for e in manifest.experts if e.id == expert_id), None)
        if entry is None:
            raise ExpertSetError(f"adapter_sources names {expert_id!r}, which is not in experts")
        dest = root / entry.adapter
        if Path(src).resolve() != dest.resolve():
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(src, dest)
    (root / MANIFEST).write_text(manifest.model_dump_json(indent=2, exclude_none=True))
    return load(root)


def pack(directory: str | Path, tar_path: str | Path) -> Path:
    """Tar an expert set directory (after validating it) into the single file an ``expert-set`` artifact stores."""
    load(directory)
    out = Path(tar_path)
    with tarfile.open(out, "w") as tar:
        for p in sorted(Path(directory).iterdir()):
            tar.add(p, arcname=p.name)
    return out


def unpack(tar_path: str | Path, directory: str | Path) -> ExpertSet:
    """Extract an ``expert-set`` artifact (a tar, as :func:`pack` writes) into ``directory`` and load it."""
    dest = Path(directory)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, "..", devices and links out of dest
    except (tarfile.TarError, OSError) as exc:
        raise ExpertSetError(f"{tar_path} is not a readable expert-set tar: {exc}") from None
    return load(dest)


# --- the adapters against the base model ---------------------------------------------------------------
def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of an adapter's weights, read from the file header (no tensors are loaded)."""
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    import torch

    state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _module_dims(module: Any) -> tuple[int, int] | None:
    """(in, out) features of a LoRA-able layer: nn.Linear, GPT-2's Conv1D (weight [in, out]), or None."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def check_against_base(expert_set: ExpertSet, model: Any) -> None:
    """Every adapter must fit ``model`` (the loaded base): LoRA type, target layers present, matching shapes.

    Raises :class:`ExpertSetError` naming the first expert that does not fit (e.g. adapters trained on another
    base), so a router refuses the set before serving instead of failing on the first request.
    """
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    declared = expert_set.manifest.base_model.hidden_size
    if declared is not None and hidden is not None and declared != hidden:
        raise ExpertSetError(f"expert set {expert_set.name!r} declares base hidden_size {declared} but the loaded "
                             f"base {expert_set.manifest.base_model.ref!r} has {hidden}")
    for e in expert_set.manifest.experts:
        adir = expert_set.root / e.adapter
        cfg = json.loads((adir / "adapter_config.json").read_text())
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise ExpertSetError(f"adapter is {cfg.get('peft_type')!r}, not a LoRA", expert=e.id)
        shapes = adapter_shapes(adir)
        if not any(".lora_A." in k for k in shapes):
            raise ExpertSetError("adapter has no lora_A weights", expert=e.id)
        for key, shape in shapes.items():
            for part, want in ((".lora_A.", "in"), (".lora_B.", "out")):
                if part not in key:
                    continue
                path = key.split(part)[0].removeprefix("base_model.model.")
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    raise ExpertSetError(f"adapter targets layer {path!r}, which the base "
                                         f"{expert_set.manifest.base_model.ref!r} does not have (trained on "
                                         f"another base? target_modules={cfg.get('target_modules')})",
                                         expert=e.id) from None
                dims = _module_dims(module)
                if dims is None:
                    continue  # an embedding or other layer type: presence is the check
                have = dims[0] if want == "in" else dims[1]
                got = shape[1] if want == "in" else shape[0]
                if got != have:
                    raise ExpertSetError(f"adapter layer {path!r} expects {want}_features={got} but the base "
                                         f"{expert_set.manifest.base_model.ref!r} has {have} (hidden size "
                                         f"mismatch: trained on another base?)", expert=e.id)
