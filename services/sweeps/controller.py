"""The sweep controller, run by the scheduler every cycle (``run_once``): for each unsettled sweep it reports the
trial jobs' new intermediate values to optuna, asks optuna's pruner whether to stop them, tells optuna how each
finished trial ended, asks optuna for new trials while the budget and the concurrency allow, submits their jobs
through the ordinary job path, and settles the sweep (status, best trial, webhook).

Several schedulers: a sweep is handled by whoever locks its row (``FOR UPDATE SKIP LOCKED``); the lock is held
until that pass commits. Every step is idempotent, so a pass that dies halfway is simply done again:

* intermediate values: optuna keeps the first value of a step; our ``event_cursor`` says what was read;
* tells: ``skip_if_finished``, and a trial optuna already finished is only brought up to date on our side;
* asks: an optuna trial that was asked but never recorded (the pass died after ``ask``) is adopted by the next
  pass instead of asking again; trial jobs carry an Idempotency-Key ``sweep-<id>-trial-<n>``.

Each pass talks to optuna first and writes our rows last (optuna commits on its own connection; on SQLite a write
of ours held open would lock optuna out). A trial whose job is retried (a killed worker, a lost lease) stays
running: only a terminal job status ends a trial, so a retried attempt is waited for, never counted as failed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import DomainError
from services.jobs import service as job_service
from services.sweeps import space
from services.sweeps import study as study_mod
from services.sweeps.service import finish, trials
from shared import lifecycle
from shared.db import session_scope
from shared.models import Job, JobEvent, JobStatus, Sweep, SweepTrial, utcnow
from shared.specs import parse_spec
from shared.specs.sweeps import SweepSpec

log = logging.getLogger("crucible.sweeps")
EARLY_FAILURES = 3  # this many failed trials and none that completed: the sweep fails instead of burning its budget


def run_once(settings: Any) -> int:
    """The scheduler's hook: advance every unsettled sweep, then sync their MLflow runs. Never raises."""
    changed = 0
    try:
        changed = advance_all()
    except Exception:
        log.exception("sweeps: controller pass failed; the next cycle retries")
    try:
        from services.sweeps.tracking import sync_runs
        from shared.tracking import Tracker

        sync_runs(lambda: Tracker(settings))
    except Exception as e:
        log.warning("could not sync sweeps' MLflow runs (retrying next cycle): %s", e)
    return changed


def advance_all(*, batch: int = 20) -> int:
    with session_scope() as s:
        ids = list(s.scalars(select(Sweep.id).where(Sweep.settled.is_(False)).order_by(Sweep.created_at)
                             .limit(batch)))
    changed = 0
    for sweep_id in ids:
        try:
            with session_scope() as s:
                changed += advance(s, sweep_id)
        except Exception:
            log.exception("sweep %s: controller pass failed; retrying next cycle", sweep_id)
    return changed


@dataclass
class _Plan:
    """What a pass decided while talking to optuna, written to our tables afterwards."""

    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial id -> column updates
    prune: list[tuple[Job, str]] = field(default_factory=list)
    new: list[tuple[int, int, dict[str, Any], dict[str, Any] | str]] = field(default_factory=list)
    # (number, optuna trial id, params, spec or why the sampled spec is invalid)


def advance(session: Session, sweep_id: uuid.UUID) -> int:
    """One pass over one sweep; returns 1 if anything changed. Skips a sweep another scheduler holds."""
    sweep = session.scalars(select(Sweep).where(Sweep.id == sweep_id, Sweep.settled.is_(False))
                            .with_for_update(skip_locked=True)).first()
    if sweep is None:
        return 0
    spec = SweepSpec.model_validate(sweep.definition)
    rows = trials(session, sweep)
    study = study_mod.load(sweep.study_name, spec, trials_so_far=len(rows))
    plan = _Plan()
    with session.no_autoflush:  # reads only until optuna is done (see the module docstring)
        for t in rows:
            if t.state == "running":
                _observe(session, study, spec, t, plan)
        if sweep.status == "running":
            _ask(study, spec, sweep, rows, plan)
        else:
            _close_orphans(study, rows)
    return _apply(session, sweep, spec, rows, plan)


def _observe(session: Session, study: Any, spec: SweepSpec, t: SweepTrial, plan: _Plan) -> None:
    """New intermediate values of a running trial, its pruning, and its end."""
    from optuna.trial import TrialState

    frozen = study_mod.storage().get_trial(t.optuna_trial_id)
    if t.job_id is None:  # the sampled spec was refused: a failed trial
        _tell(study, t.number, TrialState.FAIL)
        plan.rows[t.id] = {"state": "failed", "finished_at": utcnow()}
        return
    # The job first, then its events: a terminal status read here means every event it wrote is visible below.
    job = session.scalars(select(Job).where(Job.id == t.job_id).execution_options(populate_existing=True)).first()
    if job is None:
        _tell(study, t.number, TrialState.FAIL)
        plan.rows[t.id] = {"state": "failed", "reason": "its job was deleted", "finished_at": utcnow()}
        return
    metric, step_key = spec.objective.metric, spec.objective.step_key
    events = session.execute(select(JobEvent.id, JobEvent.data).where(
        JobEvent.job_id == job.id, JobEvent.type == "metrics", JobEvent.id > t.event_cursor)
        .order_by(JobEvent.id)).all()
    update: dict[str, Any] = {}
    reported = False
    last_step, last_value = t.last_step, t.last_value
    for event_id, data in events:
        update["event_cursor"] = event_id
        values = data.get("values") or {}
        if metric not in values:
            continue
        step = int(values.get(step_key, data.get("step", 0)))
        value = float(values[metric])
        if not frozen.state.is_finished() and step not in frozen.intermediate_values:
            study_mod.storage().set_trial_intermediate_value(t.optuna_trial_id, step, value)
            frozen.intermediate_values[step] = value
            reported = True
        last_step, last_value = step, value
    update |= {"last_step": last_step, "last_value": last_value}
    if job.status.terminal:
        update |= _outcome(study, spec, t, job, last_value)
    elif (reported and not job.cancel_requested and spec.early_stopping.type != "none"
          and study.pruner.prune(study, study_mod.storage().get_trial(t.optuna_trial_id))):
        plan.prune.append((job, f"pruned by {spec.early_stopping.type} at {step_key} {last_step}: {metric} "
                                f"{last_value:.6g} is not among the best of the trials that reached it"))
    plan.rows[t.id] = update


def _outcome(study: Any, spec: SweepSpec, t: SweepTrial, job: Job, last_value: float | None) -> dict[str, Any]:
    from optuna.trial import TrialState

    metric = spec.objective.metric
    done: dict[str, Any] = {"finished_at": utcnow()}
    if job.status == JobStatus.SUCCEEDED:
        value = (job.result or {}).get(metric, last_value)
        if value is None:
            _tell(study, t.number, TrialState.FAIL)
            return done | {"state": "failed", "reason": f"the job succeeded but reported no {metric!r} (metrics "
                                                         f"or result); it reported: {', '.join(job.result or {})}"}
        _tell(study, t.number, TrialState.COMPLETE, float(value))
        return done | {"state": "complete", "value": float(value)}
    if job.status == JobStatus.PRUNED:
        _tell(study, t.number, TrialState.PRUNED)
        return done | {"state": "pruned", "value": last_value, "reason": job.status_reason}
    _tell(study, t.number, TrialState.FAIL)
    return done | {"state": "failed", "reason": f"job {job.status.value}: {job.status_reason}"}


def _tell(study: Any, number: int, state: Any, value: float | None = None) -> None:
    from optuna.trial import TrialState

    if state == TrialState.COMPLETE:
        study.tell(number, value, skip_if_finished=True)
    else:
        study.tell(number, state=state, skip_if_finished=True)


def _ask(study: Any, spec: SweepSpec, sweep: Sweep, rows: list[SweepTrial], plan: _Plan) -> None:
    from optuna.trial import TrialState

    ending = {i for i, u in plan.rows.items() if u.get("state", "running") != "running"}
    running = sum(1 for t in rows if t.state == "running" and t.id not in ending)
    total = len(rows)
    known = {t.number for t in rows}
    orphans = [ft for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if ft.number not in known]
    dists = space.distributions(spec)
    while total < sweep.max_trials and running < sweep.max_concurrency:
        if orphans:
            ft = orphans.pop(0)
            number, trial_id, params = ft.number, ft._trial_id, dict(ft.params)
        else:
            study.sampler = study_mod.sampler(spec, trials_so_far=len(study.get_trials(deepcopy=False)))
            trial = study.ask(fixed_distributions=dists)
            number, trial_id, params = trial.number, trial._trial_id, dict(trial.params)
        plan.new.append((number, trial_id, params, _trial_spec(spec, sweep, number, params)))
        total += 1
        running += 1


def _trial_spec(spec: SweepSpec, sweep: Sweep, number: int, params: dict[str, Any]) -> dict[str, Any] | str:
    raw = space.apply(spec.base, params)
    raw["name"] = f"{sweep.name}.trial-{number}"[:200]
    raw["tags"] = {**(raw.get("tags") or {}), "crucible.sweep": str(sweep.id), "crucible.trial": str(number)}
    try:
        return parse_spec(raw).model_dump(mode="json")
    except (ValidationError, ValueError) as e:
        return f"the sampled spec is invalid: {e}"[:2000]


def _close_orphans(study: Any, rows: list[SweepTrial]) -> None:
    """A sweep that stopped asking: optuna trials it asked for but never recorded end as failed."""
    from optuna.trial import TrialState

    known = {t.number for t in rows}
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if ft.number not in known:
            _tell(study, ft.number, TrialState.FAIL)


def _apply(session: Session, sweep: Sweep, spec: SweepSpec, rows: list[SweepTrial], plan: _Plan) -> int:
    """Our writes, after optuna: trial rows, prune requests, new trial jobs, the sweep's status and best."""
    changed = bool(plan.new or plan.prune) or any(
        "state" in u or u.get("last_step") != t.last_step for t in rows if (u := plan.rows.get(t.id)))
    by_id = {t.id: t for t in rows}
    for trial_id, update in plan.rows.items():
        for k, v in update.items():
            setattr(by_id[trial_id], k, v)
    for job, reason in plan.prune:
        lifecycle.prune(session, job, reason=reason)
        log.info("sweep %s: %s (job %s)", sweep.id, reason, job.id)
    for number, trial_id, params, trial_spec in plan.new:
        row = SweepTrial(sweep_id=sweep.id, number=number, optuna_trial_id=trial_id, params=params, state="running")
        if isinstance(trial_spec, str):
            row.reason = trial_spec  # told FAIL next pass (job_id None)
        else:
            row.job_id, row.reason = _submit_trial(session, sweep, number, trial_spec)
        session.add(row)
        rows.append(row)
    _settle(session, sweep, spec, rows)
    return int(changed)


def _submit_trial(session: Session, sweep: Sweep, number: int,
                  trial_spec: dict[str, Any]) -> tuple[uuid.UUID | None, str | None]:
    savepoint = session.begin_nested()
    try:
        job, _ = job_service.submit(session=session, project_id=sweep.project_id, spec=parse_spec(trial_spec),
                                    idempotency_key=f"sweep-{sweep.id}-trial-{number}")
    except DomainError as e:  # e.g. the dataset was deleted since the sweep was submitted
        savepoint.rollback()
        return None, f"the trial's job was refused: {e.message}"
    savepoint.commit()
    return job.id, None


def _settle(session: Session, sweep: Sweep, spec: SweepSpec, rows: list[SweepTrial]) -> None:
    done = [t for t in rows if t.state == "complete" and t.value is not None]
    if done:
        sign = 1.0 if spec.objective.direction == "minimize" else -1.0
        best = min(done, key=lambda t: (sign * float(t.value or 0.0), t.number))  # the earliest of equals
        new_best = {"trial": best.number, "value": best.value, "params": best.params,
                    "job_id": str(best.job_id) if best.job_id else None}
        if sweep.best != new_best:  # a JSON column is rewritten on any assignment
            sweep.best = new_best
    running = [t for t in rows if t.state == "running"]
    failed = [t for t in rows if t.state == "failed"]
    if sweep.status == "running":
        if not done and not any(t.state == "pruned" for t in rows) and len(failed) >= EARLY_FAILURES:
            for t in running:
                job = session.get(Job, t.job_id) if t.job_id else None
                if job is not None:
                    lifecycle.cancel(session, job)
            finish(session, sweep, "failed", f"the first {len(failed)} trials failed (last: {failed[-1].reason}); "
                                             "fix the base spec or the search space")
        elif len(rows) >= sweep.max_trials and not running:
            if done:
                finish(session, sweep, "succeeded", f"{len(done)} of {len(rows)} trials complete; best trial "
                                                    f"{sweep.best['trial']}: {spec.objective.metric} "
                                                    f"{sweep.best['value']:.6g}")
            else:
                finish(session, sweep, "failed", f"no trial completed ({len(failed)} failed, "
                                                 f"{len(rows) - len(failed)} pruned)")
    if sweep.status != "running" and not running:
        sweep.settled = True
