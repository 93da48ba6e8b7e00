"""optuna, as the sweeps use it: its study storage in OUR database (``RDBStorage`` on the project's SQLAlchemy URL,
Postgres or the embedded SQLite), and the sampler and pruner a sweep asks for.

optuna's tables are made by our migration 0006 (``shared/models/sweeps.py`` mirrors them), so the storage is opened
with ``skip_table_creation`` and ``skip_compatibility_check``: optuna's own alembic must not read our
``alembic_version`` as its own. optuna is pinned in pyproject; a version that changes its schema needs a migration.

Samplers and pruners hold no state we rely on between scheduler cycles: everything they read is in the storage.
A sampler is built per ``ask`` with seed ``sampler.seed + trials so far``, so any scheduler replica draws the same
sequence a single one would, and a fresh sampler never repeats the previous draw.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

from shared.config import get_settings
from shared.specs.sweeps import SweepSpec

log = logging.getLogger(__name__)
_lock = threading.Lock()
_storages: dict[str, Any] = {}


def storage(url: str | None = None) -> Any:
    """One ``optuna.storages.RDBStorage`` per database URL and process (it holds an engine)."""
    import optuna

    url = url or get_settings().DATABASE_URL
    with _lock:
        found = _storages.get(url)
        if found is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            kwargs: dict[str, Any] = ({"connect_args": {"timeout": 30}} if url.startswith("sqlite")
                                      else {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4})
            found = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True,
                                               skip_table_creation=True)
            _storages[url] = found
    return found


def reset() -> None:
    """Forget the cached storages (tests that switch databases)."""
    with _lock:
        for s in _storages.values():
            s.engine.dispose()
        _storages.clear()


def sampler(spec: SweepSpec, *, trials_so_far: int) -> Any:
    import optuna

    from services.sweeps.space import grid_space

    seed = spec.sampler.seed + trials_so_far
    if spec.sampler.type == "grid":
        grid, _ = grid_space(spec)
        return optuna.samplers.GridSampler(grid, seed=seed)
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: running trials count as (pessimistic) observations, so concurrent trials spread out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
                                          constant_liar=True)


def pruner(spec: SweepSpec) -> Any:
    import optuna

    es = spec.early_stopping
    if es.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=es.min_resource, reduction_factor=es.reduction_factor,
            min_early_stopping_rate=es.min_early_stopping_rate)
    if es.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=es.startup_trials, n_warmup_steps=es.warmup_steps)
    return optuna.pruners.NopPruner()


def load(study_name: str, spec: SweepSpec, *, trials_so_far: int = 0) -> Any:
    """The sweep's study (created on first use), with its sampler and pruner."""
    import optuna

    return optuna.create_study(storage=storage(), study_name=study_name, direction=spec.objective.direction,
                               sampler=sampler(spec, trials_so_far=trials_so_far), pruner=pruner(spec),
                               load_if_exists=True)


def delete(study_name: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=study_name, storage=storage())
    except KeyError:
        pass
