"""``distill`` jobs: SimReg and CompRess knowledge distillation from frozen teachers (ssl.md §5).

* ``simreg``   - regression of normalised teacher features through per-teacher MLP heads;
* ``compress`` - KL between teacher and student similarity distributions over memory banks
  (``CompressLoss`` is reused by the poison-scanner's KD backdoor defense);
* ``teachers`` - loading frozen teachers from checkpoints; ``train`` - the job (``run(ctx)``/``train``).

Both methods expose ``student`` (the exported backbone), ``trainable_parameters()`` and
``step(view, teacher_feats) -> StepOutput``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StepOutput:
    loss: Tensor  # the scalar that is back-propagated
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached monitors (no host sync here)
