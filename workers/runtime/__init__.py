"""The worker runtime: a Celery task that supervises a method running in a child process.

* ``supervisor.py`` - claims the job, prepares inputs, starts/monitors/stops the child, records results.
* ``lease.py``      - ``LeaseKeeper``: renews the attempt's lease from the claim on (writes are fenced by it).
* ``warm.py``       - starting children: cold per job, or pre-started (warm) and handed the next job.
* ``child.py``      - the child process entry point (``python -m workers.runtime.child WORKDIR | --warm``).
* ``context.py``    - ``JobContext``: what a method sees (spec, inputs, progress, metrics, checkpoints).
* ``events.py``     - ``EventRelay``: the child's logs and events to Postgres (fenced batches) and MLflow.
* ``protocol.py``   - the wire protocol between the two (exit codes, typed events on their own channel).
* ``resources.py``  - out-of-memory evidence from the cgroup.
* ``inputs.py``     - datasets and checkpoints materialised on the worker.
"""
