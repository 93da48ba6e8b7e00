"""ssl-trainer worker methods (``train.run`` is the job entry point).

``train`` - the generic loop; ``methods.METHODS`` - the registry; ``base`` - the shared skeleton (online
encoder + predictor, EMA target, memory bank); ``msf`` (MSF, BYOL = MSF with k = 1), ``cmsf`` with
``constraints`` and ``pseudo_labels`` (CMSF: 2q, kmeans, supervised, semi-supervised, cross-modal), ``isd``
(ISD r18 / plus); ``state`` - seeding, RNG snapshots, resume checks and the exported checkpoint part.
"""
