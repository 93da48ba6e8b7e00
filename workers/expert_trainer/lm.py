"""Language-model pieces the expert jobs share: tokenised documents, packed training chunks, per-document
negative log-likelihood (perplexity), and LoRA adapters attached to / loaded onto the frozen base with ``peft``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.specs.experts import LoraOptions


def encode(tokenizer: Any, texts: list[str], max_len: int | None = None) -> list[list[int]]:
    """Token ids of each text (no special tokens), cut to ``max_len``; an empty text becomes one EOS."""
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = list(ids) or [int(tokenizer.eos_token_id)]
        out.append(ids[:max_len] if max_len else ids)
    return out


def pack(docs: list[list[int]], seq_len: int, eos: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into ``[n, seq_len]`` chunks (the tail is padded by
    wrapping to the start, so even one short document gives one full chunk)."""
    stream: list[int] = []
    for d in docs:
        stream += d + [eos]
    if not stream:
        raise ValueError("no tokens to pack")
    n = max(1, len(stream) // seq_len)
    need = n * seq_len
    while len(stream) < need:
        stream += stream[: need - len(stream)]
    return torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def doc_nll(model: nn.Module, docs: list[list[int]], *, batch_size: int = 8, pad_id: int = 0,
            device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per document: summed next-token NLL (nats) and the number of predicted tokens (``len - 1``).

    Perplexity of a set of documents = exp(sum of NLL / sum of tokens) (token-weighted)."""
    device = device or next(model.parameters()).device
    nll = np.zeros(len(docs))
    count = np.zeros(len(docs))
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths batch with less padding
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(docs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(docs[i])] = torch.tensor(docs[i])
            mask[r, :len(docs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        valid = mask[:, 1:].bool()
        tok_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        per_doc = (tok_nll * valid).sum(1).cpu().numpy()
        for r, i in enumerate(idx):
            nll[i], count[i] = per_doc[r], max(0, len(docs[i]) - 1)
    return nll, count


def perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    total = float(np.sum(count))
    return math.exp(float(np.sum(nll)) / total) if total > 0 else float("nan")


def lora_config(opts: LoraOptions) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                      target_modules=list(opts.target_modules), task_type="CAUSAL_LM", bias="none")


def check_targets(model: nn.Module, opts: LoraOptions) -> None:
    """Every target module name must name at least one linear layer of the base (peft's own error is opaque)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(opts.target_modules) - names)
    if missing:
        from workers.runtime.context import JobConfigError

        raise JobConfigError(f"lora.target_modules {missing} are not linear layers of this base model; it has: "
                             f"{', '.join(sorted(names))}")


def attach_lora(model: nn.Module, opts: LoraOptions, adapter_name: str = "default") -> Any:
    """The base wrapped with a fresh trainable LoRA (only the adapter's A/B matrices require grad)."""
    from peft import get_peft_model

    check_targets(model, opts)
    return get_peft_model(model, lora_config(opts), adapter_name=adapter_name)


def adapter_files(peft_model: Any) -> dict[str, bytes]:
    """The adapter as peft saves it (``adapter_config.json`` + ``adapter_model.safetensors``), as bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        name = peft_model.active_adapter
        root = Path(tmp) / name if (Path(tmp) / name / "adapter_config.json").is_file() else Path(tmp)
        return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def write_adapter(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def load_adapters(base: nn.Module, adapters: dict[str, Path]) -> Any:
    """A ``PeftModel`` over ``base`` holding every adapter (name -> directory); none active until ``set_adapter``."""
    from peft import PeftModel

    items = list(adapters.items())
    if not items:
        raise ValueError("no adapters to load")
    first, path = items[0]
    model = PeftModel.from_pretrained(base, str(path), adapter_name=first, is_trainable=False)
    for name, p in items[1:]:
        model.load_adapter(str(p), adapter_name=name, is_trainable=False)
    model.eval()
    return model
