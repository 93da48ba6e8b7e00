"""The worker runtime: a Celery task that supervises a method running in a child process.

* ``supervisor.py`` - claims the job, prepares inputs, starts/monitors/stops the child, records results.
* ``child.py``      - the child process entry point (``python -m workers.runtime.child WORKDIR``).
* ``context.py``    - ``JobContext``: what a method sees (spec, inputs, progress, metrics, checkpoints).
* ``protocol.py``   - the tiny wire protocol between the two (exit codes, event lines).
"""
