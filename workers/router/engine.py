"""The replica's model: one frozen base shared by every expert, LoRA adapters swapped or mixed per batch.

MoIN §5.4 step 5: "group requests by expert, then hot-swap or batch the LoRAs (PEFT ``set_adapter``, or
multi-LoRA batching)". ``Engine.generate`` takes a batch of rows, each with its expert (``None`` = the frozen
base, the router's low-margin fallback), and runs it as one ``generate`` call:

* every row on the same expert: ``set_adapter(expert)`` (the homogeneous batch per-expert batching forms);
* every row on the base: with the adapters disabled;
* a mix: peft's per-row ``adapter_names=`` (``"__base__"`` for the base rows), one forward per step.

Decoding is greedy, stops per row at EOS or the row's own ``max_new_tokens``, and streams each row's text as it
grows (``on_text``). Adapters are made resident through the ``AdapterCache`` (LRU, budget, pins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from workers.router.adapters import AdapterCache
from workers.text.base_model import BaseLM
from workers.text.expert_set import ExpertSet, adapter_shapes

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class PromptTooLong(ValueError):
    """The prompt plus the tokens to generate exceed the base model's context."""


@dataclass
class Row:
    prompt: str
    expert: str | None  # None: the frozen base
    max_new_tokens: int
    on_text: Callable[[str], None] | None = None
    tokens: list[int] = field(default_factory=list)  # filled by generate
    text: str = ""
    finish: str = ""  # "eos" | "length"


class _RowStreamer:
    """Receives each decoding step's tokens (transformers' streamer protocol) and feeds every row's callback."""

    def __init__(self, rows: Sequence[Row], tokenizer: Any, eos: int | None) -> None:
        self.rows, self.tok, self.eos = rows, tokenizer, eos
        self._prompt_seen = False
        self._done = [False] * len(rows)
        self._sent = [0] * len(rows)

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        for i, tok in enumerate(value.reshape(-1).tolist()):
            row = self.rows[i]
            if self._done[i]:
                continue
            if self.eos is not None and tok == self.eos:
                self._done[i], row.finish = True, "eos"
                continue
            row.tokens.append(int(tok))
            if len(row.tokens) >= row.max_new_tokens:
                self._done[i], row.finish = True, "length"
            self._emit(i)

    def _emit(self, i: int) -> None:
        row = self.rows[i]
        text = self.tok.decode(row.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not self._done[i]:
            return  # half of a multi-byte character: wait for the rest
        row.text = text
        if row.on_text is not None and len(text) > self._sent[i]:
            row.on_text(text[self._sent[i]:])
        self._sent[i] = len(text)

    def end(self) -> None:
        for i, row in enumerate(self.rows):
            if not row.finish:
                row.finish = "length"
            self._done[i] = True
            self._emit(i)


def _row_limits(prompt_len: int, limits: Sequence[int]) -> Any:
    """A StoppingCriteria that stops each row at its own ``max_new_tokens``."""
    import torch
    from transformers import StoppingCriteria

    limit = torch.tensor(list(limits))

    class RowLimits(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            return (input_ids.shape[1] - prompt_len) >= limit.to(input_ids.device)

    return RowLimits()


class Engine:
    def __init__(self, base: BaseLM, expert_set: ExpertSet, *, budget_bytes: int, pinned: Sequence[str] = (),
                 cache: bool = True, on_load: Callable[[str], None] | None = None,
                 on_evict: Callable[[str], None] | None = None) -> None:
        self.base, self.expert_set = base, expert_set
        self.tokenizer = base.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        self.peft: Any = None  # the PeftModel, made with the first adapter
        elem = next(iter(base.model.parameters())).element_size()
        self._elem = elem
        self.cache = AdapterCache(budget_bytes=budget_bytes, size_of=self._adapter_bytes, load=self._load,
                                  unload=self._unload, pinned=pinned, enabled=cache, on_load=on_load,
                                  on_evict=on_evict)

    @property
    def model(self) -> Any:
        return self.peft if self.peft is not None else self.base.model

    @property
    def device(self) -> Any:
        return next(iter(self.base.model.parameters())).device

    @property
    def context_length(self) -> int:
        return self.base.max_positions

    def adapters_off(self) -> AbstractContextManager[Any]:
        """A context in which the base runs without any adapter (the fallback, the base-mean embedder)."""
        return self.peft.disable_adapter() if self.peft is not None else nullcontext()

    # --- adapters ---------------------------------------------------------------------------
    def _adapter_bytes(self, expert: str) -> int:
        shapes = adapter_shapes(self.expert_set.adapter_dir(expert))
        n = 0
        for shape in shapes.values():
            size = 1
            for d in shape:
                size *= int(d)
            n += size
        return n * self._elem

    def _load(self, expert: str) -> None:
        path = str(self.expert_set.adapter_dir(expert))
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base.model, path, adapter_name=expert, is_trainable=False)
            self.peft.eval()
        else:
            self.peft.load_adapter(path, adapter_name=expert, is_trainable=False)

    def _unload(self, expert: str) -> None:
        assert self.peft is not None
        self.peft.delete_adapter(expert)

    # --- tokens -----------------------------------------------------------------------------
    def check_prompt(self, prompt: str, max_new_tokens: int) -> int:
        """Prompt length in tokens; ``PromptTooLong`` when it and the new tokens exceed the context."""
        n = len(self.tokenizer(prompt).input_ids)
        if n == 0:
            raise PromptTooLong("the prompt is empty after tokenisation")
        if n + max_new_tokens > self.context_length:
            raise PromptTooLong(f"the prompt is {n} tokens and {max_new_tokens} new tokens were asked for, but the "
                                f"base model's context is {self.context_length} tokens; shorten the prompt or "
                                "lower max_new_tokens")
        return n

    # --- generation -------------------------------------------------------------------------
    def generate(self, rows: Sequence[Row]) -> Sequence[Row]:
        """Generate every row in one batched call (see the module docstring); rows are filled in place."""
        import torch

        experts = [r.expert for r in rows]
        adapters = sorted({e for e in experts if e is not None})
        loaded = self.cache.acquire(adapters) if adapters else []
        try:
            enc = self.tokenizer([r.prompt for r in rows], return_tensors="pt", padding=True).to(self.device)
            model = self.model
            eos = self.tokenizer.eos_token_id
            streamer = _RowStreamer(rows, self.tokenizer, eos)
            kwargs: dict[str, Any] = {
                "input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "do_sample": False,
                "max_new_tokens": max(r.max_new_tokens for r in rows), "streamer": streamer, "pad_token_id": eos,
                "stopping_criteria": [_row_limits(enc.input_ids.shape[1], [r.max_new_tokens for r in rows])]}
            with torch.inference_mode():
                if not adapters:
                    if self.peft is not None:
                        with self.peft.disable_adapter():
                            self.peft.generate(**kwargs)
                    else:
                        model.generate(**kwargs)
                elif len(set(experts)) == 1:
                    self.peft.set_adapter(adapters[0])
                    self.peft.generate(**kwargs)
                else:
                    self.peft.generate(**kwargs, adapter_names=[e if e is not None else BASE for e in experts])
        finally:
            self.cache.release(loaded)
        return rows

    def logits(self, prompts: Sequence[str], experts: Sequence[str | None]) -> Any:
        """Next-token logits of each prompt under its expert, one batched forward (tests, evaluation)."""
        import torch

        adapters = sorted({e for e in experts if e is not None})
        loaded = self.cache.acquire(adapters) if adapters else []
        try:
            enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                if not adapters:
                    if self.peft is None:
                        return self.base.model(**enc).logits[:, -1]
                    with self.peft.disable_adapter():
                        return self.peft(**enc).logits[:, -1]
                if len(set(experts)) == 1:
                    self.peft.set_adapter(adapters[0])
                    return self.peft(**enc).logits[:, -1]
                return self.peft(**enc, adapter_names=[e if e is not None else BASE for e in experts]).logits[:, -1]
        finally:
            self.cache.release(loaded)
