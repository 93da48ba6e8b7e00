"""Shared representation-learning skeleton (ssl.md section 1, "shared template").

Pluggable pieces that MSF uses and CMSF / ISD / SimReg / CompRess can reuse:

* ``backbones`` - torchvision ResNets with CIFAR/ImageNet stems; loader that asserts a full load;
* ``heads``     - the Linear-BN-ReLU-Linear MLP head and ``Encoder`` (backbone + projection);
* ``ema``       - momentum targets (parameters only);
* ``bank``      - FIFO memory bank with chunked (optionally masked) top-k, ``chunked_topk`` over any
                keys, and row gathering;
* ``augment``   - batched per-sample weak/strong views; ``data`` - two-view/eval datasets and loaders;
* ``schedule``  - per-epoch cosine/step LR; ``knn`` - FAISS k-NN evaluation (majority + weighted);
* ``device``    - device choice, AMP/channels-last on CUDA only, thread count;
* ``distributed`` - torchrun process group, rank-aware collectives, synchronised BatchNorm (CPU too), DDP;
* ``local``     - ``LocalContext``, the JobContext stand-in for direct (non-platform) calls;
* ``checkpoints`` - the model-checkpoint contract and ``load_encoder`` (frozen, asserted full load);
* ``training``  - seeding, RNG snapshots, resume-compatibility check for resumable jobs.

Nothing here touches torch at import time beyond importing it (safe before a worker forks).
"""
