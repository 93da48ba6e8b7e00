"""MoIN experts with the tiny random causal LM: LoRA save/load/swap, the NLL against a literal loop, the merge of
tiny clusters, corpus validation and hold-out, the pipeline fan-in, and the whole chain run in-process."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.data.corpus import CorpusError, assign_splits, canonical_jsonl, held_out, read_jsonl, read_upload
from shared.specs.experts import (
    ClusterSpec,
    EmbedSpec,
    ExpertSetSpec,
    LoraOptions,
    MoinEvalSpec,
    TrainExpertSpec,
)
from workers.expert_trainer.cluster import merge_small, oracle_map, purity
from workers.expert_trainer.lm import adapter_files, attach_lora, doc_nll, encode, load_adapters, write_adapter
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.text.base_model import fingerprint, load_base

JOB = "job:00000000-0000-0000-0000-0000000000{:02d}"


def _random_adapter(seed: int) -> dict[str, bytes]:
    base = load_base("tiny-random")
    model = attach_lora(base.model, LoraOptions(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero (the adapter is a no-op until trained): make it act
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter_files(model)


def test_lora_save_load_swap_gives_each_expert_its_output_and_the_base_when_disabled(tmp_path: Path) -> None:
    files = {name: _random_adapter(seed) for name, seed in (("e0", 1), ("e1", 2))}
    dirs = {name: write_adapter(f, tmp_path / name) for name, f in files.items()}
    reference = load_base("tiny-random").model
    ids = torch.tensor([encode(load_base("tiny-random").tokenizer, ["the quick brown fox jumps"])[0]])
    with torch.no_grad():
        base_logits = reference(input_ids=ids).logits
        model = load_adapters(load_base("tiny-random").model, dirs)
        out = {}
        for name in dirs:
            model.set_adapter(name)
            out[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        # one adapter loaded on its own gives what it gave in the multi-adapter model (load is exact)
        alone = load_adapters(load_base("tiny-random").model, {"e1": dirs["e1"]})(input_ids=ids).logits
    assert (out["e0"] - out["e1"]).abs().max() > 1e-3
    assert (out["e0"] - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(disabled, base_logits)
    torch.testing.assert_close(alone, out["e1"])


def test_doc_nll_matches_a_literal_token_by_token_loop() -> None:
    base = load_base("tiny-random")
    docs = encode(base.tokenizer, ["a short one", "a somewhat longer document, padded in its batch", "x"])
    nll, cnt = doc_nll(base.model, docs, batch_size=2, pad_id=int(base.tokenizer.pad_token_id))
    with torch.no_grad():
        for d, (got, n) in enumerate(zip(nll, cnt, strict=True)):
            total = 0.0
            for t in range(1, len(docs[d])):  # predict token t from tokens < t, one prefix at a time
                logits = base.model(input_ids=torch.tensor([docs[d][:t]])).logits[0, -1]
                total -= float(torch.log_softmax(logits.double(), -1)[docs[d][t]])
            assert n == len(docs[d]) - 1
            assert got == pytest.approx(total, rel=1e-4, abs=1e-4)


def test_base_fingerprint_is_stable_and_tells_bases_apart() -> None:
    a, b = load_base("tiny-random").model, load_base("tiny-random").model
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert fingerprint(a) != fingerprint(b)


def test_tiny_clusters_merge_into_their_nearest_and_are_renumbered_by_size() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32)
    near0 = centres[0] * 0.9 + centres[3] * 0.1  # a small cluster close to cluster 0
    sizes = [30, 20, 10]
    x = np.concatenate([centres[i] + 0.01 * rng.standard_normal((n, 8)) for i, n in enumerate(sizes)] +
                       [near0 + 0.01 * rng.standard_normal((3, 8))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assign = np.repeat([2, 0, 1, 3], [30, 20, 10, 3])  # deliberately not ordered by size
    cents = np.stack([centres[1], centres[2], centres[0], near0 / np.linalg.norm(near0)])
    new, new_cents, merges = merge_small(x, assign, cents, min_size=5)
    assert merges == [(3, 2)]  # the 3-row cluster went to the one around centres[0]
    assert np.bincount(new).tolist() == [33, 20, 10]
    assert np.allclose(np.linalg.norm(new_cents, axis=1), 1.0)
    # a minimum above every size merges until one cluster is left
    one, _, m = merge_small(x, assign, cents, min_size=1000)
    assert set(one.tolist()) == {0} and len(m) == 3
    topics = ["a"] * 30 + ["b"] * 20 + ["c"] * 10 + ["b"] * 3
    assert purity(new, topics) == pytest.approx(60 / 63)
    assert oracle_map(new, topics) == {"a": 0, "b": 1, "c": 2}


def test_jsonl_validation_names_the_line_and_the_reason() -> None:
    good = '{"text": "one", "topic": "a"}\n\n{"text": "two", "topic": "b", "split": "test"}\n'
    corpus = read_jsonl(good)
    assert corpus.texts == ["one", "two"] and corpus.topics == ["a", "b"] and corpus.splits[1] == "test"
    for bad, needle in [
        ('{"text": "ok"}\n{"text": ', "line 2: not valid JSON"),
        ('{"txt": "typo"}\n', "line 1: unknown key(s) ['txt']"),
        ('{"text": ""}\n', "line 1: 'text' must be a non-empty string"),
        ('{"text": "a", "topic": "x"}\n{"text": "b"}\n', "either every document has a 'topic' or none"),
        ('{"text": "a", "split": "dev"}\n', "'split' must be 'train' or 'test'"),
        ('[1, 2]\n', "line 1: expected a JSON object"),
        ('\n\n', "no documents"),
    ]:
        with pytest.raises(CorpusError, match=None) as e:
            read_jsonl(bad)
        assert needle in str(e.value), (bad, str(e.value))


def test_hold_out_is_per_document_and_keeps_train_and_test_in_every_topic() -> None:
    texts = [f"document number {i}" for i in range(200)]
    topics: list[str | None] = ["a" if i % 2 else "b" for i in range(200)]
    splits = assign_splits(texts, topics, [None] * 200)
    assert splits == assign_splits(list(reversed(texts)), list(reversed(topics)), [None] * 200)[::-1]
    share = splits.count("test") / 200
    assert 0.1 < share < 0.3 and all(held_out(t) == (s == "test") for t, s in zip(texts, splits, strict=True))
    # two documents of a topic, both hashed into train: one is moved to test so the topic can be scored
    assert sorted(assign_splits(["x1", "x2"], ["t", "t"], [None, None])) == ["test", "train"]


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_plain_text_archive_takes_topics_from_folders_and_splits_from_train_test(tmp_path: Path) -> None:
    p = tmp_path / "c.tar.gz"
    p.write_bytes(_tar({"train/news/1.txt": b"a news story", "train/code/1.txt": b"def f(): pass",
                        "test/news/2.txt": b"another story", "README.md": b"ignored", ".DS_Store": b"x"}))
    report = read_upload(p, "c.tar.gz", max_files=100, max_unpacked_bytes=10**6)
    c = report.corpus
    assert sorted(zip(c.topics, c.splits, c.texts, strict=True)) == [
        ("code", "train", "def f(): pass"), ("news", "test", "another story"), ("news", "train", "a news story")]
    assert read_jsonl(canonical_jsonl(c)).splits == c.splits  # the stored form keeps the decided splits
    p.write_bytes(_tar({"news/1.txt": b"\xff\xfe not utf-8"}))
    with pytest.raises(CorpusError, match="entry news/1.txt: not UTF-8"):
        read_upload(p, "c.tar.gz", max_files=100, max_unpacked_bytes=10**6)
    with pytest.raises(CorpusError, match="unsupported text corpus"):
        read_upload(p, "c.csv", max_files=100, max_unpacked_bytes=10**6)


def test_the_moin_template_compiles_with_a_fan_in_and_list_outputs_are_not_gathered() -> None:
    from services.pipelines import templates as tpl
    from services.pipelines.compile import PipelineInvalid, compile_pipeline

    t = tpl.template("moin-experts")
    defn = compile_pipeline(t["steps"], tpl.bind_params(t, {}))
    assert defn["order"] == ["embed", "cluster", "train", "expert-set"]
    assert defn["steps"]["expert-set"]["parents"] == ["cluster", "train"]
    steps = {**t["steps"], "expert-set": {**t["steps"]["expert-set"], "clustering": "${steps.train.checkpoint}"}}
    with pytest.raises(PipelineInvalid) as e:  # a gathered list where one checkpoint is expected
        compile_pipeline(steps, tpl.bind_params(t, {}))
    assert "fans out into several jobs" in str(e.value) and "clustering" in str(e.value)


def _ckpt(ctx: LocalContext[Any], tmp_path: Path, name: str) -> dict[str, str]:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(ctx.checkpoints[-1]["data"])
    return {"path": str(path)}


def test_the_chain_embed_cluster_experts_set_eval_in_process(tmp_path: Path) -> None:
    """tfidf-svd + tiny-random on the built-in multidomain corpus: every stage runs and the numbers hold up."""
    from workers.expert_trainer import cluster, embed, evaluate, expert_set, train_expert

    ds = {"uri": "builtin://multidomain"}
    c: LocalContext[Any] = LocalContext(EmbedSpec(embedder={"kind": "tfidf-svd", "dim": 32}), inputs={"dataset": ds})
    embed.run(c)
    emb = _ckpt(c, tmp_path, "embed")
    c = LocalContext(ClusterSpec(embeddings=JOB.format(1), k=6, min_cluster_size=100),
                     inputs={"checkpoints": {"embeddings": emb}})
    cluster.run(c)
    assert c.result is not None and c.result["purity"] > 0.7 and c.result["min_size"] >= 100
    clusters, clu = c.outputs["clusters"], _ckpt(c, tmp_path, "cluster")
    training = {"base_model": "tiny-random", "total_tokens": 12_000, "seq_len": 32, "batch_size": 4,
                "eval_docs": 12, "lr": 3e-3}
    experts = []
    for k in clusters:
        c = LocalContext(TrainExpertSpec(clustering=JOB.format(2), cluster=k, training=training),
                         inputs={"dataset": ds, "checkpoints": {"clustering": clu}})
        train_expert.run(c)
        assert c.result is not None and c.result["expert_ppl"] < c.result["base_ppl"]
        experts.append(_ckpt(c, tmp_path, f"e{k}"))
    sizes = [torch.load(e["path"], weights_only=False)["expert"]["size"] for e in experts]
    steps = [torch.load(e["path"], weights_only=False)["crucible"]["step"] for e in experts]
    assert steps == sorted(steps, reverse=True) and sizes == sorted(sizes, reverse=True)  # budget ∝ cluster size
    with pytest.raises(JobConfigError, match="cluster 99 does not exist"):
        train_expert.run(LocalContext(TrainExpertSpec(clustering=JOB.format(2), cluster=99, training=training),
                                      inputs={"dataset": ds, "checkpoints": {"clustering": clu}}))

    ids = [JOB.format(10 + i) for i in range(len(experts))]
    inputs = {"clustering": clu, **{f"experts.{i}": e for i, e in enumerate(experts)}}
    with pytest.raises(JobConfigError, match=r"no expert for cluster\(s\) \[0\]"):
        expert_set.run(LocalContext(ExpertSetSpec(clustering=JOB.format(2), experts=ids[1:]),
                                    inputs={"checkpoints": {"clustering": clu, **{f"experts.{i}": e for i, e in
                                                                                 enumerate(experts[1:])}}},
                                    workdir=tmp_path / "bad"))
    c = LocalContext(ExpertSetSpec(clustering=JOB.format(2), experts=ids, fallback_margin=0.01),
                     inputs={"checkpoints": inputs}, workdir=tmp_path)
    expert_set.run(c)
    assert c.artifacts[0]["artifact_kind"] == "expert-set" and c.artifacts[0]["meta"]["register_model"] == "moin"
    es_ckpt = _ckpt(c, tmp_path, "set")
    c = LocalContext(MoinEvalSpec(expert_set=JOB.format(3)), inputs={"dataset": ds,
                                                                     "checkpoints": {"expert_set": es_ckpt}},
                     workdir=tmp_path)
    evaluate.run(c)
    r = c.result
    assert r is not None and r["documents"] == 160
    assert r["routing_accuracy"] > 0.7 and r["oracle_agreement"] > 0.7
    assert r["ppl_routed"] < r["ppl_base"] and all(math.isfinite(r[k]) for k in r)
    assert 0 <= r["fallback_share"] <= 1


def test_a_hugging_face_directory_loads_as_a_base_and_a_bad_reference_says_what_to_pass(tmp_path: Path) -> None:
    tiny = load_base("tiny-random")
    tiny.model.save_pretrained(tmp_path / "hf")
    tiny.tokenizer.save_pretrained(tmp_path / "hf")
    loaded = load_base(str(tmp_path / "hf"))
    assert fingerprint(loaded.model) == fingerprint(tiny.model)
    assert loaded.tokenizer("abc")["input_ids"] == tiny.tokenizer("abc")["input_ids"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base(str(tmp_path))
    with pytest.raises(ValueError, match="smollm2-135m"):
        TrainExpertSpec(cluster="all", training={"base_model": "gpt-5"})
