"""PatchSearch (Tejankar et al., CVPR 2023; methods file §2), split by stage:

* ``inputs``     - the frozen model, the training images with their files, the poison manifest;
* ``clusters``   - (a) embeddings, faiss k-means, the cluster-assignment head, test set and queues;
* ``score``      - (b) Grad-CAM candidate windows and the flip-count poison score;
* ``search``     - (c) the iterative search with geometric pruning and its stop rule;
* ``classifier`` - (d) the poison-classifier ensemble on the top-k window bank, and removal;
* ``metrics``    - detection metrics against the manifest; ``outputs`` - scores, patch grid, filtered dataset;
* ``job``        - the ``patchsearch`` job (``run(ctx)``) and ``patchsearch(...)`` for direct calls.
"""
