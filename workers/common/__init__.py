"""Modality-neutral pieces every worker kind's training code uses (vision, text/LLM, CLIP).

* ``device``      - device choice, AMP/channels-last on CUDA only, thread count;
* ``distributed`` - torchrun process group, rank-aware collectives, synchronised BatchNorm (CPU too), DDP;
* ``schedule``    - per-epoch/per-step cosine and step LR;
* ``seeding``     - seeding and RNG snapshots for checkpoints;
* ``guards``      - resume-compatibility check, finite-loss guard, metric formatting;
* ``context``     - ``MethodContext[SpecT]``, the protocol of the job and the local (direct-call) contexts;
* ``loop``        - ``TrainingLoop`` + ``Method``: the one training loop every trainer runs on.

Nothing here imports vision or text code; ``workers.vision`` and ``workers.text`` build on it.
"""
