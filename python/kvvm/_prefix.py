"""Prefix sharing (see ``docs/prefix-sharing.md``): the C signatures and the ``Cache`` methods,
kept in their own module. ``install`` adds the methods to ``kvvm.Cache``."""

from __future__ import annotations

import ctypes
from typing import Iterable

_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64
_P = ctypes.POINTER


class PrefixStats(ctypes.Structure):
    _fields_ = [(name, _u64) for name in (
        "cached_pages", "reclaimable_pages", "lookups", "hits", "hit_tokens", "bytes_saved",
        "published_pages", "evicted_pages")]


assert ctypes.sizeof(PrefixStats) == 64


def _signatures(handle):
    return {
        "kvvm_cache_tokens_per_page": [handle, _P(_u64)],
        "kvvm_cache_publish": [handle, _u32, _P(_u32), _u64, _u64, _P(_u64)],
        "kvvm_cache_publish_keys": [handle, _u32, _P(_u64), _u64, _P(_u64)],
        "kvvm_cache_alloc_slot_with_prefix": [handle, _P(_u32), _u64, _u64, _P(_u32), _P(_u64)],
        "kvvm_cache_alloc_slot_with_prefix_keys": [handle, _P(_u64), _u64, _u64, _P(_u32),
                                                   _P(_u64)],
        "kvvm_cache_evict_prefixes": [handle, _u64, _P(_u64)],
        "kvvm_cache_read_only_tokens": [handle, _u32, _P(_u64)],
        "kvvm_cache_prefix_stats": [handle, _P(PrefixStats)],
    }


def _array(ctype, values: Iterable[int]):
    values = list(values)
    return (ctype * max(len(values), 1))(*values), len(values)


def install(cache_cls, get_library, check, handle_type) -> None:
    declared = []

    def lib():
        library = get_library()
        if not declared:
            for name, argtypes in _signatures(handle_type).items():
                f = getattr(library, name)
                f.restype = _u32
                f.argtypes = argtypes
            declared.append(True)
        return library

    def tokens_per_page(self) -> int:
        """Tokens one page index of a slot holds: the unit of prefix sharing."""
        out = _u64()
        check(lib().kvvm_cache_tokens_per_page(self._h(), ctypes.byref(out)))
        return out.value

    def publish(self, slot: int, tokens: Iterable[int], namespace: int = 0) -> int:
        """Publishes the slot's full pages covered by its token ids ``tokens`` (from its first
        token); they become read-only. Returns the leading page indices now read-only."""
        arr, n = _array(_u32, tokens)
        out = _u64()
        check(lib().kvvm_cache_publish(self._h(), slot, arr, n, namespace,
                                          ctypes.byref(out)))
        return out.value

    def publish_keys(self, slot: int, keys: Iterable[int]) -> int:
        """``publish`` with the caller's own per-page keys (equal keys must mean equal KV)."""
        arr, n = _array(_u64, keys)
        out = _u64()
        check(lib().kvvm_cache_publish_keys(self._h(), slot, arr, n,
                                              ctypes.byref(out)))
        return out.value

    def alloc_slot_with_prefix(self, tokens: Iterable[int], namespace: int = 0) -> tuple[int, int]:
        """Allocates a slot for a request with token ids ``tokens`` whose longest cached chain
        of full pages is already mapped (read-only). Returns ``(slot, reused_tokens)``: the slot
        holds ``reused_tokens`` tokens; prefill the rest."""
        arr, n = _array(_u32, tokens)
        slot, reused = _u32(), _u64()
        check(lib().kvvm_cache_alloc_slot_with_prefix(
            self._h(), arr, n, namespace, ctypes.byref(slot), ctypes.byref(reused)))
        return slot.value, reused.value

    def alloc_slot_with_prefix_keys(self, keys: Iterable[int],
                                    tokens_hint: int = 0) -> tuple[int, int]:
        """``alloc_slot_with_prefix`` with the caller's own per-page keys."""
        arr, n = _array(_u64, keys)
        slot, reused = _u32(), _u64()
        check(lib().kvvm_cache_alloc_slot_with_prefix_keys(
            self._h(), arr, n, tokens_hint, ctypes.byref(slot),
            ctypes.byref(reused)))
        return slot.value, reused.value

    def evict_prefixes(self, pages: int) -> int:
        """Evicts up to ``pages`` cached page indices no slot maps; returns pool pages freed."""
        out = _u64()
        check(lib().kvvm_cache_evict_prefixes(self._h(), pages, ctypes.byref(out)))
        return out.value

    def read_only_tokens(self, slot: int) -> int:
        """Leading tokens of ``slot`` mapped read-only (shared or published)."""
        out = _u64()
        check(lib().kvvm_cache_read_only_tokens(self._h(), slot,
                                                  ctypes.byref(out)))
        return out.value

    def prefix_stats(self) -> dict:
        """The prefix index's counters."""
        s = PrefixStats()
        check(lib().kvvm_cache_prefix_stats(self._h(), ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in PrefixStats._fields_}

    for f in (tokens_per_page, publish, publish_keys, alloc_slot_with_prefix,
              alloc_slot_with_prefix_keys, evict_prefixes, read_only_tokens, prefix_stats):
        setattr(cache_cls, f.__name__, f)
