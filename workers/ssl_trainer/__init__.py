"""ssl-trainer worker methods: MSF / BYOL pre-training (``train.run`` is the job entry point)."""
