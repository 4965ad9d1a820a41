"""kvvm as the KV cache of a Hugging Face ``transformers`` model.

:class:`KvvmCache` is a ``transformers.Cache`` whose keys and values live in a :class:`kvvm.Cache`:
each sequence of the batch gets a slot, the model's attention reads the slots' K/V through
DLPack views of kvvm's memory (no copy), and every new token is written into them in place. The
slots of a batch are allocated adjacent, so a layer's ``[batch, heads, tokens, head_dim]`` keys
are a strided slice of kvvm's whole-batch tensor. With a :class:`kvvm.SwapEngine`,
:meth:`KvvmCache.preempt` moves the batch's KV to host memory and frees its slots, and
:meth:`KvvmCache.resume` brings it back into whichever slots are free then.

    import torch, kvvm
    from transformers import AutoModelForCausalLM
    from kvvm.integrations.transformers import KvvmCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    store = kvvm.Cache.from_hf_config(model.config, max_slots=8, max_tokens=4096,
                                      budget_bytes=2 << 30, dtype=torch.bfloat16)
    with KvvmCache(store) as cache:
        out = model.generate(**inputs, cache=cache, max_new_tokens=64)

(Older transformers versions take ``past_key_values=cache``; tested with transformers 5.25.) The cache works with any model
whose attention layers call ``Cache.update`` with ``[batch, kv_heads, new_tokens, head_dim]``
tensors (Llama, Mistral, Qwen2, ... with full attention) on the device kvvm's memory lives on
(CPU for the host backend, the cache's GPU for the CUDA backend). Greedy and sampling decoding
work; beam search and other batch reordering do not (they raise ``NotImplementedError``).

One :class:`KvvmCache` holds one batch; several can share a :class:`kvvm.Cache` (its slots and page
budget). Close it (``close()`` or a ``with`` block) to free its slots and host copies.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache as _HFCache
from transformers.cache_utils import CacheLayerMixin

import kvvm

__all__ = ["KvvmCache", "KvvmLayer", "torch_dtype"]

_TORCH_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
for _name, _attr in (("fp8-e4m3", "float8_e4m3fn"), ("fp8-e5m2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH_DTYPES[_name] = getattr(torch, _attr)


def torch_dtype(cache: kvvm.Cache) -> torch.dtype:
    """The ``torch.dtype`` of a kvvm cache's elements."""
    return _TORCH_DTYPES[cache.dtype]


class KvvmLayer(CacheLayerMixin):
    """One model layer of a :class:`KvvmCache`: its token count; the data is in kvvm.
    ``keys``/``values`` are the views returned by the last ``update``."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: "KvvmCache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._owner._bind(key_states)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._owner._append(self, key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._owner.kvvm.max_tokens

    def reset(self) -> None:
        self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KvvmCache does not reorder batches (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KvvmCache does not reorder batches")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("KvvmCache does not reorder batches")


class KvvmCache(_HFCache):
    """A ``transformers`` cache storing K/V in ``cache`` (a :class:`kvvm.Cache` shaped for the
    model, e.g. by :meth:`kvvm.Cache.from_hf_config`), one slot per sequence of the batch.

    Slots are allocated at the first forward pass (when the batch size is known) and mapped as
    the sequences grow (``kvvm.Cache.step``). ``swap`` (a :class:`kvvm.SwapEngine` of the same
    cache) enables :meth:`preempt` and :meth:`resume`.
    """

    def __init__(self, cache: kvvm.Cache, swap: kvvm.SwapEngine | None = None):
        self._layers = [KvvmLayer(self, i) for i in range(cache.layers)]
        super().__init__(layers=list(self._layers))
        self.kvvm = cache
        self.swap = swap
        self.dtype = torch_dtype(cache)
        self._slots: list[int | None] = []  # per sequence: its slot, None while swapped out
        self._copies: list[int | None] = []  # per sequence: its host copy, if any
        self._tokens = 0  # tokens every slot holds
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # whole-batch tensors
        self._rows: slice | torch.Tensor | None = None  # the batch's slots in those tensors

    # ---- what transformers calls

    def _bind(self, key_states: torch.Tensor) -> None:
        if self._slots:
            return
        batch, heads, _, dim = key_states.shape
        c = self.kvvm
        if (heads, dim) != (c.kv_heads, c.head_dim):
            raise ValueError(f"the model's K/V have {heads} heads of {dim}, the kvvm cache "
                             f"{c.kv_heads} of {c.head_dim}")
        if key_states.dtype != self.dtype:
            raise TypeError(f"the model computes K/V in {key_states.dtype}, the kvvm cache "
                            f"stores {self.dtype}")
        if self._kv is None:
            self._kv = c.kv_tensors(torch.from_dlpack)
        if key_states.device != self._kv[0][0].device:
            raise ValueError(f"the model runs on {key_states.device}, the kvvm cache's memory "
                             f"is on {self._kv[0][0].device}")
        self._slots = list(c.alloc_slots(batch))
        self._copies = [None] * batch
        self._tokens = 0
        self._index()

    def _index(self) -> None:
        """Where the batch's rows are in the whole-batch tensors: a slice when the slots are
        adjacent (zero-copy reads), else an index tensor (reads gather)."""
        slots = self._live_slots()
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self._rows = slice(slots[0], slots[0] + len(slots))
        else:
            self._rows = torch.tensor(slots, dtype=torch.long)

    def _live_slots(self) -> list[int]:
        slots = [s for s in self._slots if s is not None]
        if len(slots) != len(self._slots):
            raise RuntimeError("the cache is preempted: call resume() before running the model")
        return slots

    def _append(self, layer: KvvmLayer, key_states: torch.Tensor,
                value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._live_slots()
        assert self._kv is not None  # set by _bind
        start = layer.length
        end = start + key_states.shape[-2]
        if end > self._tokens:  # the first layer of a forward pass maps the new tokens
            self.kvvm.step({s: end for s in slots})
            self._tokens = end
        k_all, v_all = self._kv[layer.layer_idx]
        rows = self._rows
        if isinstance(rows, slice):
            k, v = k_all[rows], v_all[rows]  # [batch, max_tokens, heads, dim], no copy
            k[:, start:end].copy_(key_states.transpose(1, 2))
            v[:, start:end].copy_(value_states.transpose(1, 2))
            keys, values = k[:, :end], v[:, :end]
        else:
            k_all[rows, start:end] = key_states.transpose(1, 2)
            v_all[rows, start:end] = value_states.transpose(1, 2)
            keys, values = k_all[rows, :end], v_all[rows, :end]
        layer.length = end
        return keys.transpose(1, 2), values.transpose(1, 2)  # [batch, heads, tokens, dim]

    def crop(self, tokens_to_remove: int) -> None:
        slots = self._live_slots() if self._slots else []
        super().crop(tokens_to_remove)
        keep = max(layer.length for layer in self._layers)
        if slots and keep < self._tokens:
            for s in slots:
                self.kvvm.shrink(s, keep)
            self._tokens = keep

    def reset(self) -> None:
        self.release()

    # ---- kvvm

    @property
    def slots(self) -> list[int | None]:
        """Each sequence's slot (None while preempted)."""
        return list(self._slots)

    @property
    def preempted(self) -> bool:
        return any(s is None for s in self._slots)

    def preempt(self) -> None:
        """Swaps the batch's KV out to host memory and frees its slots (waits for the
        transfers). Other requests can use the slots and pages meanwhile; :meth:`resume` brings
        the KV back. Sequences already preempted are skipped; on an error, the sequences
        swapped so far stay preempted and the others keep their slots."""
        swap = self._swap()
        started, error = [], None
        for i, s in enumerate(self._slots):
            if s is None:
                continue
            try:
                started.append((i, swap.swap_out(s)))
            except kvvm.KvvmError as e:
                error = e
                break
        for i, ticket in started:
            with ticket:
                try:
                    ticket.wait()
                except kvvm.KvvmError as e:
                    error = error or e
                    continue
                self._copies[i] = ticket.copy
                self._slots[i] = None
        if error is not None:
            raise error

    def resume(self) -> None:
        """Swaps a preempted batch back in, into free slots (adjacent ones when available; the
        slots may differ from those it had). Waits for the transfers. The host copies are kept
        as a cache, so that preempting again copies only the tokens added since."""
        swap = self._swap()
        todo = [i for i, s in enumerate(self._slots) if s is None]
        if not todo:
            return
        new: list[int] = []
        try:
            if len(todo) == len(self._slots):
                try:
                    new = list(self.kvvm.alloc_slots(len(todo), self._tokens))
                except kvvm.SlotsExhaustedError:
                    new = []
            while len(new) < len(todo):
                new.append(self.kvvm.alloc_slot(self._tokens))
        except BaseException:
            for s in new:
                self.kvvm.free_slot(s)
            raise
        # All or nothing: on any error every new slot is freed again (after its transfer ended)
        # and every sequence stays preempted, its host copy intact.
        tickets, error = [], None
        for i, s in zip(todo, new):
            try:
                copy = self._copies[i]
                assert copy is not None  # set by preempt
                tickets.append(swap.swap_in(copy, s))
            except BaseException as e:
                error = e
                break
        for t in tickets:
            with t:
                try:
                    t.wait()
                except kvvm.KvvmError as e:
                    error = error or e
        if error is not None:
            for s in new:
                self.kvvm.free_slot(s)
            raise error
        for i, s in zip(todo, new):
            self._slots[i] = s
        self._index()

    def release(self) -> None:
        """Frees the batch's slots and host copies; the cache can then take a new batch."""
        slots, copies = self._slots, self._copies
        self._slots, self._copies, self._tokens, self._rows = [], [], 0, None
        for layer in self.layers:
            layer.reset()
        for s in slots:
            if s is not None:
                self.kvvm.free_slot(s)
        if self.swap is not None and not self.swap.closed:
            for c in set(c for c in copies if c is not None):
                try:
                    self.swap.release(c)
                except kvvm.InvalidArgumentError:
                    pass  # a cached copy the engine has evicted already

    close = release

    def __enter__(self) -> "KvvmCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _swap(self) -> kvvm.SwapEngine:
        if self.swap is None:
            raise RuntimeError("preempt/resume need a kvvm.SwapEngine: KvvmCache(cache, swap)")
        return self.swap
