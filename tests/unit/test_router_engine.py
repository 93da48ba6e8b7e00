"""The router replica's model side on a tiny random Llama: LoRA save/load/swap, mixed batches, fallback, the
adapter LRU, routing on hand-built vectors, and expert sets that do not fit their base."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import router_set
from workers.router.adapters import AdapterBudgetError, AdapterCache
from workers.text import expert_set as es


# --- routing ------------------------------------------------------------------------------------------------
def test_route_returns_the_nearest_centroid_and_the_top_two_margin() -> None:
    centroids = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]], dtype=np.float32)
    queries = np.array([[10, 1, 0], [0, 0, 3], [0.5, 0.9, 0], [0, 0, 0]], dtype=np.float32)
    idx, margin = es.route(queries, centroids)
    assert idx.tolist() == [0, 2, 3, 0]
    # a literal reference: cosines, best minus second best
    q = queries[:3] / np.linalg.norm(queries[:3], axis=1, keepdims=True)
    sims = np.sort(q @ centroids.T, axis=1)
    assert margin[:3] == pytest.approx(sims[:, -1] - sims[:, -2], abs=1e-6)
    assert margin[3] == 0.0  # a zero vector always falls back
    one_idx, one_margin = es.route(queries[:1], centroids[:1])
    assert one_idx.tolist() == [0] and one_margin[0] == es.SINGLE_CENTROID_MARGIN
    with pytest.raises(ValueError, match="must be"):
        es.route(np.ones((1, 2)), centroids)


# --- the LRU ------------------------------------------------------------------------------------------------
class Tracker:
    def __init__(self) -> None:
        self.resident: set[str] = set()
        self.loads: list[str] = []

    def load(self, i: str) -> None:
        assert i not in self.resident
        self.resident.add(i)
        self.loads.append(i)

    def unload(self, i: str) -> None:
        self.resident.remove(i)


def test_lru_evicts_least_recent_by_budget_and_never_a_pinned_adapter() -> None:
    t = Tracker()
    sizes = {"a": 40, "b": 30, "c": 30, "p": 30, "big": 80}
    cache = AdapterCache(budget_bytes=100, size_of=sizes.__getitem__, load=t.load, unload=t.unload, pinned=["p"])
    assert t.resident == {"p"}
    cache.acquire(["a"])
    cache.acquire(["b"])  # 30 + 40 + 30 = 100: fits exactly
    assert set(cache.resident) == {"p", "a", "b"} and cache.used_bytes == 100
    cache.acquire(["a"])  # a is now the most recent; b the least recent unpinned
    cache.acquire(["c"])
    assert set(cache.resident) == {"p", "a", "c"} and t.resident == {"p", "a", "c"}
    assert cache.stats.evictions == {"b": 1}
    for _ in range(5):  # churn through everything: p stays
        for i in ("a", "b", "c"):
            cache.acquire([i])
            assert "p" in t.resident and cache.used_bytes <= 100
    assert "p" not in cache.stats.evictions and cache.stats.loads["p"] == 1
    with pytest.raises(AdapterBudgetError, match="budget"):
        cache.acquire(["big"])  # 80 + pinned 30 > 100
    with pytest.raises(AdapterBudgetError, match="pinned"):
        AdapterCache(budget_bytes=20, size_of=sizes.__getitem__, load=t.load, unload=t.unload, pinned=["a"])


def test_lru_keeps_a_whole_batch_and_the_disabled_cache_reloads_every_time() -> None:
    t = Tracker()
    cache = AdapterCache(budget_bytes=90, size_of=lambda _: 30, load=t.load, unload=t.unload)
    cache.acquire(["a", "b", "c"])
    loaded = cache.acquire(["c", "d"])  # evicts a (least recent), never c, which this batch needs
    assert loaded == ["d"] and set(cache.resident) == {"b", "c", "d"}
    off = AdapterCache(budget_bytes=90, size_of=lambda _: 30, load=t.load, unload=t.unload, enabled=False)
    t.loads.clear()
    for _ in range(3):
        off.release(off.acquire(["x"]))
    assert t.loads == ["x", "x", "x"] and off.resident == []


# --- the engine on a tiny expert set ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> es.ExpertSet:
    import torch

    torch.set_num_threads(2)
    return es.load(router_set.build(tmp_path_factory.mktemp("set") / "set", n_experts=3))


def _engine(expert_set: es.ExpertSet, **kw: Any) -> Any:
    from workers.router.engine import Engine
    from workers.text.base_model import load_base

    return Engine(load_base(expert_set.manifest.base_model.ref), expert_set, budget_bytes=kw.pop("budget", 2**26),
                  **kw)


def test_adapters_change_the_output_per_expert_and_disabled_gives_the_base(tiny_set: es.ExpertSet) -> None:
    import torch

    from workers.text.base_model import load_base

    engine = _engine(tiny_set)
    prompts = ["hello there", "x"]
    plain = load_base(tiny_set.manifest.base_model.ref).model
    enc = engine.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        reference = plain(**enc).logits[:, -1]
    per = {e: engine.logits(prompts, [e, e]) for e in ("e0", "e1", "e2")}
    base = engine.logits(prompts, [None, None])  # adapters loaded but disabled
    assert torch.allclose(base, reference, atol=1e-5)
    for a in per:
        assert (per[a] - base).abs().max() > 1e-2
        for b in per:
            if a < b:
                assert (per[a] - per[b]).abs().max() > 1e-2
    assert torch.equal(engine.logits(prompts, ["e1", "e1"]), per["e1"])  # swapping back is exact


def test_a_mixed_batch_matches_each_row_run_on_its_own_adapter(tiny_set: es.ExpertSet) -> None:
    import torch

    from workers.router.engine import Row

    engine = _engine(tiny_set)
    prompts = ["the court ruled", "def f(x):", "goal!", "bake it"]
    experts: list[str | None] = ["e0", "e1", None, "e2"]
    mixed = engine.logits(prompts, experts)
    alone = torch.stack([engine.logits(prompts, [e] * len(prompts))[i] for i, e in enumerate(experts)])
    assert torch.allclose(mixed, alone, atol=1e-5)
    rows = engine.generate([Row(p, e, 6) for p, e in zip(prompts, experts, strict=True)])
    for row in rows:
        single = engine.generate([Row(row.prompt, row.expert, 6)])[0]
        assert single.tokens == row.tokens and len(row.tokens) == 6 and row.finish == "length"


def test_generation_streams_each_rows_text_and_stops_at_its_own_limit(tiny_set: es.ExpertSet) -> None:
    from workers.router.engine import PromptTooLong, Row

    engine = _engine(tiny_set)
    chunks: dict[int, list[str]] = {0: [], 1: []}
    rows = engine.generate([Row("abc", "e0", 3, on_text=chunks[0].append),
                            Row("abcdef", "e0", 7, on_text=chunks[1].append)])
    assert [len(r.tokens) for r in rows] == [3, 7]
    assert "".join(chunks[0]) == rows[0].text and "".join(chunks[1]) == rows[1].text
    with pytest.raises(PromptTooLong, match="context is 512 tokens"):
        engine.check_prompt("y" * 600, 8)


def test_engine_cache_budget_counts_adapter_bytes(tiny_set: es.ExpertSet) -> None:
    from workers.router.engine import Row

    one = _engine(tiny_set, budget=2**26).cache.size("e0")
    loads: list[str] = []
    engine = _engine(tiny_set, budget=2 * one, pinned=["e2"], on_load=loads.append)
    for e in ("e0", "e1", "e0", "e1"):
        engine.generate([Row("hi", e, 1)])
    assert engine.cache.resident[0] == "e2" and len(engine.cache.resident) == 2
    assert loads == ["e2", "e0", "e1", "e0", "e1"]  # budget of two: e0 and e1 take turns beside the pin
    assert sorted(engine.peft.peft_config) == sorted(engine.cache.resident)


# --- expert sets that are wrong -----------------------------------------------------------------------------
def test_an_expert_set_trained_on_another_base_is_refused_naming_the_expert(tmp_path: Path,
                                                                           tiny_set: es.ExpertSet) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from workers.text.base_model import load_base

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=258))
    with pytest.raises(es.ExpertSetError, match="expert 'e0'.*does not have"):
        es.check_against_base(tiny_set, gpt2)
    es.check_against_base(tiny_set, load_base("tiny-random").model)  # its own base fits
    # a wider model with the same layer names: the shapes do not match
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=258))
    with pytest.raises(es.ExpertSetError, match="declares base hidden_size 32 .* has 64"):
        es.check_against_base(tiny_set, wide)
    import dataclasses

    undeclared = dataclasses.replace(tiny_set, manifest=tiny_set.manifest.model_copy(
        update={"base_model": es.BaseModelRef(ref="tiny-random")}))
    with pytest.raises(es.ExpertSetError, match="expert 'e0'.*in_features=32 but the base .* has 64"):
        es.check_against_base(undeclared, wide)


def test_malformed_expert_sets_fail_with_the_field(tmp_path: Path, tiny_set: es.ExpertSet) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_set.root, bad)
    manifest = json.loads((bad / es.MANIFEST).read_text())
    with pytest.raises(es.ExpertSetError, match="experts is empty"):
        (bad / es.MANIFEST).write_text(json.dumps({**manifest, "experts": []}))
        es.load(bad)
    with pytest.raises(es.ExpertSetError, match=r"2 experts need a \[2, d\] centroid table"):
        (bad / es.MANIFEST).write_text(json.dumps({**manifest, "experts": manifest["experts"][:2]}))
        es.load(bad)
    (bad / es.MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(bad / "adapters" / "e1")
    with pytest.raises(es.ExpertSetError, match="expert 'e1': adapter directory"):
        es.load(bad)
    with pytest.raises(es.ExpertSetError, match="no expert_set.json"):
        es.load(tmp_path)
    tar = es.pack(tiny_set.root, tmp_path / "set.tar")
    again = es.unpack(tar, tmp_path / "unpacked")
    assert again.expert_ids == tiny_set.expert_ids and np.array_equal(again.centroids, tiny_set.centroids)


# --- the router job spec ------------------------------------------------------------------------------------
def test_router_spec_validates_placement_pins_and_the_expert_set_ref() -> None:
    from pydantic import ValidationError

    from shared.specs import parse_spec
    from shared.specs.router import RouterSpec

    ref = "artifact:" + "1" * 8 + "-0000-0000-0000-" + "1" * 12
    spec = parse_spec({"kind": "router", "expert_set": ref.removeprefix("artifact:")})
    assert isinstance(spec, RouterSpec) and spec.expert_set == ref  # a bare id is an artifact
    assert spec.checkpoint_inputs() == {"expert_set": ref} and spec.resources.max_runtime_s == 30 * 24 * 3600
    assert RouterSpec.input_artifact_kinds["expert_set"] == ("expert-set", "checkpoint")
    for bad, field in (({"placement": {"shard": 2, "shards": 2}}, "shard must be below shards"),
                       ({"experts": ["e0"], "pinned": ["e1"]}, "pinned experts ['e1'] are not in experts"),
                       ({"experts": ["e0", "e0"]}, "lists an expert twice"),
                       ({"expert_set": "s3://x"}, "must be job:<job id>, artifact:<artifact id>")):
        with pytest.raises(ValidationError, match=re.escape(field)):
            RouterSpec.model_validate({"kind": "router", "expert_set": ref, **bad})
