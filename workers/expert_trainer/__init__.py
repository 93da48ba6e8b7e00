"""The expert-trainer worker: MoIN experts (security-clip-experts.md §5) as jobs.

``embed`` → ``cluster`` → ``train-expert`` × K (a pipeline fan-out, ``shared/specs/pipelines/moin-experts.yaml``)
→ ``expert-set``; ``moin-eval`` scores an expert set against its baselines. Specs: ``shared/specs/experts.py``.
"""
