"""A tiny expert set for the router's tests and bench/router_perf.py: random LoRA adapters on the tiny random
Llama (workers/text/base_model.py), and centroids that are the base-mean embeddings of one text per topic, so a
query equal to (or starting like) topic i's text routes to expert i."""

from __future__ import annotations

from pathlib import Path

TOPICS = [
    "the court ruled on the appeal and the judge read the verdict",
    "def parse(x): return json.loads(x) if x else None  # python code",
    "the striker scored twice before half time and the crowd cheered",
    "mix the flour, butter and sugar, then bake for forty minutes",
]


def build(directory: Path, *, n_experts: int = 3, base: str = "tiny-random", rank: int = 4,
          target_modules: tuple[str, ...] = ("q_proj", "v_proj"), fallback_margin: float = 0.0,
          name: str = "tiny-set") -> Path:
    """Write the expert set into ``directory`` (made by ``workers.text.expert_set.save``) and return it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.router.embedder import QueryEmbedder
    from workers.text import expert_set as es
    from workers.text.base_model import load_base

    directory = Path(directory)
    src = directory.parent / f"{directory.name}-adapters"
    sources = {}
    for i in range(n_experts):
        torch.manual_seed(100 + i)
        # init_lora_weights=False: A and B both random, so each expert visibly changes the base's outputs
        model = get_peft_model(load_base(base).model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                                 target_modules=list(target_modules)))
        model.save_pretrained(str(src / f"e{i}"))
        sources[f"e{i}"] = src / f"e{i}"
    loaded = load_base(base)
    embedder = {"kind": "base-mean", "base_model": base, "max_length": 256}
    centroids = QueryEmbedder(es.EmbedderSpec.model_validate(embedder), directory, base=loaded).load().embed(
        [topic_text(i) for i in range(n_experts)])
    es.save(directory, name=name, base_model={"ref": base, "hidden_size": loaded.model.config.hidden_size},
            embedder={**embedder, "dim": int(centroids.shape[1])}, centroids=centroids,
            experts=[{"id": f"e{i}", "cluster": i, "adapter": f"adapters/e{i}", "size": 10} for i in range(n_experts)],
            fallback_margin=fallback_margin, adapter_sources=sources)
    return directory


def topic_text(i: int) -> str:
    return TOPICS[i % len(TOPICS)] + f" {i}" * (i // len(TOPICS))
