"""The kind registry: every worker kind and every job kind is declared here, once.

Everything else is derived from these declarations: the discriminated spec union and ``parse_spec``
(``shared.specs``), the declared Celery queues (``shared.celery_app``), the queue a job is published to
(``shared.lifecycle``), the entry point a child process runs (``workers.runtime.child``), ``crucible schema``,
the submit body of ``POST /v1/jobs``, the spec-examples test and the deploy test that every worker kind with
job kinds is deployed.

Adding a job kind to an existing worker kind takes the kind's own files plus one registration line:

1. ``shared/specs/<kind>.py``: a ``JobSpecBase`` subclass with ``kind: Literal["<kind>"] = "<kind>"``;
2. ``workers/<worker_kind>/<module>.py``: ``run(ctx)``, the entry point the child process calls;
3. ``shared/specs/examples/<kind>-*.yaml``: at least one example (a test keeps it valid);
4. one ``JobKind(...)`` line in ``JOB_KIND_DECLARATIONS`` below.

A new worker kind adds one ``WorkerKind(...)`` line too, plus its service in ``docker-compose.yml`` and its
Deployment in ``k8s/`` (tests/deploy checks both).

This module imports nothing heavy: specs and entry points are named as ``"module:attribute"`` strings and
imported only when asked for (``JobKind.spec_model()``), so the control plane never imports worker code.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

if TYPE_CHECKING:
    from shared.specs.common import JobSpecBase

Mode = Literal["job", "service"]
# A "value" is any JSON value (a list of them can be fanned out over); "list[...]" outputs are lists of that type.
OutputType = Literal["dataset", "file", "model", "value", "list[dataset]", "list[file]", "list[model]", "list[value]"]


OUTPUT_TYPES: tuple[str, ...] = ("dataset", "file", "model", "value", "list[dataset]", "list[file]", "list[model]",
                                 "list[value]")


class UnknownKind(ValueError, KeyError):
    """A job or worker kind that is not registered; the message lists the known ones.

    A ValueError (bad input) that is also a KeyError, so the ``Mapping`` views below keep ``.get`` and ``in``
    semantics; its message is the sentence, not KeyError's quoted key.
    """

    def __init__(self, what: str, name: object, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        head = f"a {what} is required" if name is None else f"unknown {what} {name!r}"
        super().__init__(f"{head}; known: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class WorkerKind:
    """A pool of workers (one Deployment / compose service, one Celery queue)."""

    name: str
    summary: str

    @property
    def queue(self) -> str:
        # One queue per worker kind; GPU classes can extend the suffix.
        return f"crucible.{self.name}"


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its spec model, the worker kind that runs it and the function the child process calls.

    ``mode="job"`` is bounded work with a lifecycle (queued → running → succeeded/failed); ``"service"`` is a
    long-running worker that answers requests (the router).
    """

    name: str
    spec: str  # "module:Class", a JobSpecBase subclass whose `kind` literal is `name`
    worker_kind: str
    entry_point: str  # "module:function" run inside the child process (workers/runtime/child.py)
    summary: str
    mode: Mode = "job"
    # Named outputs the method makes with ``ctx.save_output`` (beside its checkpoints), by type; pipelines
    # type-check references to them (``${steps.<step>.outputs.<name>}``) at submit.
    outputs: Mapping[str, OutputType] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for field_name in ("spec", "entry_point"):
            module, sep, attr = getattr(self, field_name).partition(":")
            if not (module and sep and attr):
                raise ValueError(f"job kind {self.name!r}: {field_name} must be 'module:attribute', "
                                 f"got {getattr(self, field_name)!r}")
        for out, typ in self.outputs.items():
            if typ not in OUTPUT_TYPES:
                raise ValueError(f"job kind {self.name!r}: output {out!r} has type {typ!r}; one of: "
                                 f"{', '.join(OUTPUT_TYPES)}")
        if self.mode not in ("job", "service"):
            raise ValueError(f"job kind {self.name!r}: mode must be 'job' or 'service', got {self.mode!r}")

    def spec_model(self) -> type[JobSpecBase]:
        """Import and return the spec class (checked to be a JobSpecBase whose `kind` default is this name)."""
        from shared.specs.common import JobSpecBase

        cls = _load(self.spec)
        if not (isinstance(cls, type) and issubclass(cls, JobSpecBase)):
            raise TypeError(f"job kind {self.name!r}: {self.spec} is not a JobSpecBase subclass")
        field = cls.model_fields.get("kind")
        if field is None or field.default != self.name:
            raise TypeError(f"job kind {self.name!r}: {self.spec} must declare "
                            f"kind: Literal[{self.name!r}] = {self.name!r}")
        return cls

    @property
    def queue(self) -> str:
        return worker_kind(self.worker_kind).queue


def _load(ref: str) -> object:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# --- the declarations ---------------------------------------------------------------------------------------
WORKER_KIND_DECLARATIONS: tuple[WorkerKind, ...] = (
    WorkerKind("ssl-trainer", "self-supervised pre-training and evaluation of vision backbones"),
    WorkerKind("distiller", "knowledge distillation from frozen teachers"),
    WorkerKind("poison-scanner", "finds poisoned training images"),
    WorkerKind("clip-bow-trainer", "CLIP-style image/bag-of-words training"),
    WorkerKind("expert-trainer", "LoRA experts for a language model"),
    WorkerKind("router", "routes requests to LoRA experts (a long-running service)"),
)

JOB_KIND_DECLARATIONS: tuple[JobKind, ...] = (
    JobKind("ssl-train", "shared.specs.ssl_train:SslTrainSpec", "ssl-trainer", "workers.ssl_trainer.train:run",
            "self-supervised pre-training (MSF, BYOL, CMSF, ISD, MoCo v2, SimCLR)"),
    # evaluation runs where the vision stack and GPUs already are
    JobKind("eval", "shared.specs.eval:EvalSpec", "ssl-trainer", "workers.evaluator.run:run",
            "k-NN and linear-probe evaluation of any checkpoint"),
    JobKind("distill", "shared.specs.distill:DistillSpec", "distiller", "workers.distiller.train:run",
            "knowledge distillation (SimReg, CompRess)"),
    JobKind("patchsearch", "shared.specs.patchsearch:PatchSearchSpec", "poison-scanner",
            "workers.poison_scanner.patchsearch.job:run", "PatchSearch: score, find and remove patch-trigger poisons",
            outputs={"filtered": "dataset", "report": "value"}),
    JobKind("poison", "shared.specs.poison:PoisonSpec", "poison-scanner", "workers.poison_scanner.poison:run",
            "patch-trigger poisoning of a dataset (SSL-Backdoor; BadNets) -> a new dataset with a manifest",
            outputs={"dataset": "dataset"}),
    JobKind("clip-train", "shared.specs.clip:ClipTrainSpec", "clip-bow-trainer", "workers.clip_bow.train:run",
            "CLIP-style training on full or bag-of-words captions (A Fistful of Words)"),
    JobKind("clip-pseudo-caption", "shared.specs.clip:ClipPseudoCaptionSpec", "clip-bow-trainer",
            "workers.clip_bow.pseudo:run", "pseudo-BoW captions for uncaptioned images -> a captioned dataset",
            outputs={"dataset": "dataset"}),
    JobKind("clip-eval", "shared.specs.clip:ClipEvalSpec", "clip-bow-trainer", "workers.clip_bow.eval_job:run",
            "zero-shot classification and image-text retrieval of a clip-train checkpoint"),
    # MoIN experts (shared/specs/experts.py): embed -> cluster -> train-expert x K -> expert-set; moin-eval
    JobKind("embed", "shared.specs.experts:EmbedSpec", "expert-trainer", "workers.expert_trainer.embed:run",
            "sentence embeddings of a text corpus (MiniLM, base LM mean-pool, TF-IDF+SVD)"),
    JobKind("cluster", "shared.specs.experts:ClusterSpec", "expert-trainer", "workers.expert_trainer.cluster:run",
            "spherical k-means of embeddings into topics; tiny clusters merged", outputs={"clusters": "list[value]"}),
    JobKind("train-expert", "shared.specs.experts:TrainExpertSpec", "expert-trainer",
            "workers.expert_trainer.train_expert:run", "one LoRA expert per cluster on the frozen base LM"),
    JobKind("expert-set", "shared.specs.experts:ExpertSetSpec", "expert-trainer",
            "workers.expert_trainer.expert_set:run", "assemble, version and register a servable expert set"),
    JobKind("moin-eval", "shared.specs.experts:MoinEvalSpec", "expert-trainer", "workers.expert_trainer.evaluate:run",
            "held-out perplexity: routed / oracle / random / base / single LoRA; routing accuracy"),
    JobKind("router", "shared.specs.router:RouterSpec", "router", "workers.router.replica:run",
            "a replica serving an expert set: routes queries to LoRA experts and generates", mode="service"),
)

_worker_kinds: dict[str, WorkerKind] = {w.name: w for w in WORKER_KIND_DECLARATIONS}
_job_kinds: dict[str, JobKind] = {}
_generation = 0  # bumped on every registration change; derived caches (the spec union) key on it


def generation() -> int:
    return _generation


def register(item: JobKind | WorkerKind) -> None:
    """Add a kind. A job kind's worker kind must already be registered; names are unique."""
    global _generation
    if isinstance(item, WorkerKind):
        if item.name in _worker_kinds:
            raise ValueError(f"worker kind {item.name!r} is already registered")
        _worker_kinds[item.name] = item
    else:
        if item.name in _job_kinds:
            raise ValueError(f"job kind {item.name!r} is already registered")
        if item.worker_kind not in _worker_kinds:
            raise UnknownKind(f"worker kind (of job kind {item.name!r})", item.worker_kind, list(_worker_kinds))
        _job_kinds[item.name] = item
    _generation += 1


def _unregister(item: JobKind | WorkerKind) -> None:
    global _generation
    if isinstance(item, WorkerKind):
        _worker_kinds.pop(item.name, None)
    else:
        _job_kinds.pop(item.name, None)
    _generation += 1


@contextmanager
def registered(*items: JobKind | WorkerKind) -> Iterator[None]:
    """Test-only: register ``items`` (worker kinds first) for the duration of the block, then remove them."""
    ordered = sorted(items, key=lambda i: not isinstance(i, WorkerKind))
    done: list[JobKind | WorkerKind] = []
    try:
        for item in ordered:
            register(item)
            done.append(item)
        yield
    finally:
        for item in reversed(done):
            _unregister(item)


for _jk in JOB_KIND_DECLARATIONS:
    register(_jk)


# --- lookups ------------------------------------------------------------------------------------------------
def job_kinds() -> tuple[JobKind, ...]:
    return tuple(_job_kinds.values())


def worker_kinds() -> tuple[WorkerKind, ...]:
    return tuple(_worker_kinds.values())


def job_kind(name: str) -> JobKind:
    try:
        return _job_kinds[name]
    except (KeyError, TypeError):
        raise UnknownKind("job kind", name, list(_job_kinds)) from None


def worker_kind(name: str) -> WorkerKind:
    try:
        return _worker_kinds[name]
    except (KeyError, TypeError):
        raise UnknownKind("worker kind", name, list(_worker_kinds)) from None


def queue_for(worker_kind_name: str) -> str:
    """Celery queue of a worker kind (one queue per kind)."""
    return worker_kind(worker_kind_name).queue


def worker_kind_for(job_kind_name: str) -> str:
    return job_kind(job_kind_name).worker_kind


def deployed_worker_kinds() -> tuple[str, ...]:
    """Worker kinds that have at least one job kind: these must be deployed (compose and every k8s overlay)."""
    with_jobs = {k.worker_kind for k in _job_kinds.values()}
    return tuple(w for w in _worker_kinds if w in with_jobs)


# --- live read-only views, for callers that iterate names ---------------------------------------------------
class _Names(Sequence[str]):
    def __init__(self, source: Mapping[str, object]) -> None:
        self._source = source

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return tuple(self._source)[i]

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return repr(tuple(self._source))


class _Field(Mapping[str, str]):
    def __init__(self, attr: Literal["worker_kind", "entry_point"]) -> None:
        self._attr = attr

    def __getitem__(self, name: str) -> str:
        value: str = getattr(job_kind(name), self._attr)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_job_kinds))

    def __len__(self) -> int:
        return len(_job_kinds)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _job_kinds


WORKER_KINDS: Sequence[str] = _Names(_worker_kinds)  # every registered worker kind's name, in declaration order
JOB_KINDS: Mapping[str, str] = _Field("worker_kind")  # job kind -> worker kind
ENTRY_POINTS: Mapping[str, str] = _Field("entry_point")  # job kind -> "module:function"
