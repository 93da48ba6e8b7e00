"""Shared representation-learning skeleton (ssl.md section 1, "shared template").

Pluggable pieces that MSF uses and CMSF / ISD / SimReg / CompRess can reuse:

* ``backbones`` - the factory over the registry in ``shared.specs.vision`` (torchvision ResNets with
                CIFAR/ImageNet stems, timm ViTs in ``vit``), one interface (pooled feature, per-stage maps,
                per-block tokens and attention probabilities); loader that asserts a full load;
* ``heads``     - the Linear-BN-ReLU-Linear MLP head and ``Encoder`` (backbone + projection);
* ``ema``       - momentum targets (parameters only);
* ``bank``      - FIFO memory bank with chunked (optionally masked) top-k, ``chunked_topk`` over any
                keys, and row gathering;
* ``augment``   - batched per-sample weak/strong views; ``data`` - two-view/eval datasets and loaders, and
                ``load_job_dataset`` (a job's dataset input, a bad one reported as a config error);
* ``knn``       - k-NN evaluation (majority + weighted) over ``workers.common.faiss_ops``;
* ``checkpoints`` - the model-checkpoint contract and ``load_encoder`` (frozen, asserted full load);

Modality-neutral pieces (device, distributed, schedules, seeding, guards) live in ``workers.common``; the
direct-call ``LocalContext`` in ``workers.runtime.local``.

Nothing here touches torch at import time beyond importing it (safe before a worker forks).
"""
