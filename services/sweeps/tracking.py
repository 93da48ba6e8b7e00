"""One MLflow parent run per sweep; each trial job's run becomes its child (tag ``mlflow.parentRunId``), so MLflow's
run comparison shows the trials side by side with their parameters (each job's run logs its whole spec, the
sampled fields included, under the same dotted names the search space uses).

The same scheme as pipelines (services/pipelines/tracking.py, whose status mapping this reuses): runs of jobs are
created by their workers, so the scheduler links them after the fact, every cycle; the parent run gets the search
space as parameters, the best value so far as a metric (step = trial number) and is closed when the sweep is
settled. MLflow trouble is logged and retried next cycle; it never blocks scheduling.
"""

from __future__ import annotations

import json
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from services.pipelines.tracking import close_runs
from shared.db import session_scope
from shared.models import Job, Project, Sweep, SweepTrial


def sync_runs(tracker_factory: Any, *, batch: int = 100) -> int:
    """Returns how many MLflow changes were made. ``tracker_factory()`` gives a ``shared.tracking.Tracker``."""
    with session_scope() as s:
        new = s.execute(select(Sweep.id, Sweep.name, Sweep.experiment, Sweep.definition, Project.name)
                        .join(Project, Project.id == Sweep.project_id)
                        .where(Sweep.mlflow_run_id.is_(None)).limit(batch)).all()
        links = s.execute(select(SweepTrial.id, SweepTrial.number, SweepTrial.params, Job.mlflow_run_id,
                                 Sweep.mlflow_run_id, Sweep.id)
                          .join(Job, Job.id == SweepTrial.job_id).join(Sweep, Sweep.id == SweepTrial.sweep_id)
                          .where(SweepTrial.run_linked.is_(False), Job.mlflow_run_id.is_not(None),
                                 Sweep.mlflow_run_id.is_not(None)).limit(batch)).all()
        bests = [(sid, run_id, best, d["objective"]["metric"]) for sid, run_id, best, logged, d in s.execute(
            select(Sweep.id, Sweep.mlflow_run_id, Sweep.best, Sweep.mlflow_best_logged, Sweep.definition)
            .where(Sweep.mlflow_run_id.is_not(None), Sweep.mlflow_closed.is_(False)).limit(batch))
            if best and best.get("trial") != logged]
        ends = s.execute(select(Sweep.id, Sweep.mlflow_run_id, Sweep.status)
                         .where(Sweep.mlflow_closed.is_(False), Sweep.mlflow_run_id.is_not(None),
                                Sweep.settled.is_(True)).limit(batch)).all()
    if not (new or links or bests or ends):
        return 0
    tracker = tracker_factory()
    done = 0
    for sid, name, experiment, definition, project in new:
        exp_id = tracker.ensure_experiment(f"{project}/{experiment}")
        run = tracker.client.create_run(exp_id, run_name=f"sweep {name}", tags={
            "crucible.sweep_id": str(sid), "crucible.project": project, "crucible.kind": "sweep"})
        tracker.client.log_batch(run.info.run_id, params=_params(definition))
        with session_scope() as s:  # another scheduler may have made one meanwhile: the first one recorded wins
            won = cast(CursorResult[Any], s.execute(update(Sweep).where(Sweep.id == sid, Sweep.mlflow_run_id.is_(None))
                                                    .values(mlflow_run_id=run.info.run_id))).rowcount == 1
        if not won:
            tracker.client.delete_run(run.info.run_id)
        done += 1
    for trial_row, number, params, run_id, parent_run, sid in links:
        tracker.set_tags(run_id, {"mlflow.parentRunId": parent_run, "crucible.sweep_id": str(sid),
                                  "crucible.sweep_trial": str(number), "crucible.sweep_params": json.dumps(params)})
        with session_scope() as s:
            row = s.get(SweepTrial, trial_row)
            if row is not None:
                row.run_linked = True
        done += 1
    for sid, run_id, best, metric in bests:
        tracker.log_metrics(run_id, [(f"best_{metric}", float(best["value"]), int(best["trial"]))])
        tracker.set_tags(run_id, {"crucible.best_trial": str(best["trial"]), "crucible.best_job": str(best["job_id"]),
                                  "crucible.best_params": json.dumps(best["params"])})
        with session_scope() as s:
            sweep = s.get(Sweep, sid)
            if sweep is not None:
                sweep.mlflow_best_logged = int(best["trial"])
        done += 1
    return done + close_runs(tracker, Sweep, ends)


def _params(definition: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    out = {"objective.metric": definition["objective"]["metric"],
           "objective.direction": definition["objective"]["direction"],
           "sampler": definition["sampler"]["type"], "early_stopping": definition["early_stopping"]["type"],
           "max_trials": str(definition["max_trials"]), "max_concurrency": str(definition["max_concurrency"]),
           **{f"search_space.{k}": json.dumps(v)[:6000] for k, v in definition["search_space"].items()}}
    return [Param(k, v) for k, v in out.items()]
