"""The replica's adapter cache: LoRA adapters resident on the shared base, LRU under a memory budget, with pins.

MoIN serves thousands of experts (§5.2, MoIN-5k) from one frozen base, so a replica cannot hold them all: it
keeps the recently used ones resident and loads the others on demand (§5.4 step 5, "hot-swap"). This class is
the policy only; loading and unloading are callbacks (``Engine`` passes peft's ``load_adapter`` /
``delete_adapter``), so the policy is tested without a model.

* ``acquire(ids)`` makes every adapter of one batch resident and marks it used now; it evicts least recently
  used adapters that are neither pinned nor in that batch until the batch fits.
* A pinned adapter is loaded at start and never evicted; pins plus one batch must fit the budget.
* ``enabled=False`` is the "no cache" mode (bench/router_perf.py, case c): ``release`` unloads what a batch
  loaded, so every request loads its adapter again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class AdapterBudgetError(RuntimeError):
    """The adapters a batch needs (plus the pinned ones) do not fit the memory budget."""


@dataclass
class CacheStats:
    loads: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)


class AdapterCache:
    def __init__(self, *, budget_bytes: int, size_of: Callable[[str], int], load: Callable[[str], None],
                 unload: Callable[[str], None], pinned: Iterable[str] = (), enabled: bool = True,
                 on_load: Callable[[str], None] | None = None,
                 on_evict: Callable[[str], None] | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError("the adapter memory budget must be positive")
        self.budget_bytes = int(budget_bytes)
        self.enabled = enabled
        self._size_of, self._load, self._unload = size_of, load, unload
        self._on_load, self._on_evict = on_load, on_evict
        self._resident: OrderedDict[str, int] = OrderedDict()  # id -> bytes, least recently used first
        self._sizes: dict[str, int] = {}
        self.pinned = frozenset(pinned)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        pinned_bytes = sum(self.size(p) for p in self.pinned)
        if pinned_bytes > self.budget_bytes:
            raise AdapterBudgetError(f"the pinned adapters need {_mb(pinned_bytes)} but the budget is "
                                     f"{_mb(self.budget_bytes)}; raise memory_budget_mb or pin fewer")
        for p in sorted(self.pinned):
            self._bring_in(p)

    def size(self, adapter_id: str) -> int:
        if adapter_id not in self._sizes:
            self._sizes[adapter_id] = int(self._size_of(adapter_id))
        return self._sizes[adapter_id]

    @property
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    @property
    def used_bytes(self) -> int:
        return sum(self._resident.values())

    def acquire(self, ids: Iterable[str]) -> list[str]:
        """Make every adapter in ``ids`` resident (one batch); returns the ones this call loaded."""
        wanted = list(dict.fromkeys(ids))
        with self._lock:
            need = sum(self.size(i) for i in wanted if i not in self._resident)
            keep = set(wanted) | self.pinned
            floor = sum(self.size(i) for i in keep)
            if floor > self.budget_bytes:
                raise AdapterBudgetError(
                    f"a batch needing adapters {wanted} ({_mb(sum(self.size(i) for i in wanted))}) does not fit "
                    f"beside the pinned ones in the budget of {_mb(self.budget_bytes)}; raise memory_budget_mb, "
                    "pin fewer adapters or lower max_batch")
            while self.used_bytes + need > self.budget_bytes:
                victim = next(i for i in self._resident if i not in keep)  # exists: floor fits the budget
                self._evict(victim)
            loaded = []
            for i in wanted:
                if i in self._resident:
                    self._resident.move_to_end(i)
                else:
                    self._bring_in(i)
                    loaded.append(i)
            return loaded

    def release(self, loaded: Iterable[str]) -> None:
        """End of a batch: with the cache disabled, unload what it loaded (pins stay)."""
        if self.enabled:
            return
        with self._lock:
            for i in loaded:
                if i in self._resident and i not in self.pinned:
                    self._evict(i)

    def _bring_in(self, adapter_id: str) -> None:
        self._load(adapter_id)
        self._resident[adapter_id] = self.size(adapter_id)
        self.stats.loads[adapter_id] = self.stats.loads.get(adapter_id, 0) + 1
        if self._on_load is not None:
            self._on_load(adapter_id)

    def _evict(self, adapter_id: str) -> None:
        assert adapter_id not in self.pinned, "a pinned adapter is never evicted"
        self._unload(adapter_id)
        del self._resident[adapter_id]
        self.stats.evictions[adapter_id] = self.stats.evictions.get(adapter_id, 0) + 1
        if self._on_evict is not None:
            self._on_evict(adapter_id)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
