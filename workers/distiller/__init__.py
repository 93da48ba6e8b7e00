"""``distill`` jobs: SimReg and CompRess knowledge distillation from frozen teachers (ssl.md §5).

* ``simreg``   - regression of normalised teacher features through per-teacher MLP heads;
* ``compress`` - KL between teacher and student similarity distributions over memory banks
  (``CompressLoss`` is reused by the poison-scanner's KD backdoor defense);
* ``teachers`` - loading frozen teachers from checkpoints; ``train`` - the job (``run(ctx)``/``train``).

Both methods expose ``student`` (the exported backbone), ``trainable_parameters()`` and
``step(view, teacher_feats) -> StepOutput`` (also their ``forward``, so DDP can wrap them); ``StepOutput`` is the
training loop's (``workers.common.loop``).
"""

from __future__ import annotations

from workers.common.loop import StepOutput

__all__ = ["StepOutput"]
