"""Registry of ssl-train methods: ``spec.method`` -> class with ``from_spec(spec, setup)``.

Every class is a ``BankMethod`` (``base.py``): ``train.py`` (on the shared loop) only calls ``step`` and the hooks,
so adding a method means writing its class and one line here.
"""

from __future__ import annotations

from typing import Any

from workers.ssl_trainer.base import BankMethod, MethodSetup
from workers.ssl_trainer.cmsf import CMSF
from workers.ssl_trainer.isd import ISD
from workers.ssl_trainer.moco import MoCo
from workers.ssl_trainer.msf import MSF
from workers.ssl_trainer.simclr import SimCLR

METHODS: dict[str, type[BankMethod]] = {
    "msf": MSF,
    "byol": MSF,  # MSF with topk = 1 (the spec enforces it): the only neighbour is the target itself
    "cmsf": CMSF,
    "isd": ISD,
    "moco": MoCo,  # v2: queue of past keys = the bank
    "simclr": SimCLR,
}


def build_method(spec: Any, setup: MethodSetup) -> BankMethod:
    try:
        cls = METHODS[spec.method]
    except KeyError:
        raise ValueError(f"unknown ssl-train method {spec.method!r}; known: {', '.join(METHODS)}") from None
    return cls.from_spec(spec, setup)
