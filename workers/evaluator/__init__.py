"""``eval`` jobs (run on the ssl-trainer worker): k-NN and the reference linear probe on any model
checkpoint - ``run.py`` (the job) and ``linear.py`` (the probe protocol)."""
