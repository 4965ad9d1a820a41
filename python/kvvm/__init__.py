"""Python binding of kvvm (KV-cache virtual memory for LLM serving) over its C ABI.

A thin ctypes layer: no compiled extension. The shared library is found through the
``KVVM_LIBRARY`` environment variable or the repository's ``target/{release,debug}/libkvvm.so``.

>>> import numpy as np, kvvm
>>> cache = kvvm.Cache(model="llama-3-8b", layers=2, max_slots=4, max_tokens=1024,
...                    budget_bytes=64 << 20, backend="host", host_granularity=64 << 10)
>>> slot = cache.alloc_slot()
>>> cache.ensure(slot, 100)
>>> k0 = np.from_dlpack(cache.view(0, "k", slot=slot, tokens=100))  # [100, kv_heads, head_dim]
>>> k0[:] = 1.0
"""

from __future__ import annotations

import ctypes
from typing import Iterable, Mapping

from . import _lib
from ._lib import ALL_SLOTS

__all__ = [
    "ALL_SLOTS",
    "Cache",
    "Slot",
    "View",
    "SwapEngine",
    "Ticket",
    "KvvmError",
    "NullPointerError",
    "InvalidHandleError",
    "InvalidArgumentError",
    "InvalidConfigError",
    "BudgetExhaustedError",
    "SlotsExhaustedError",
    "HostBudgetExhaustedError",
    "MapCountExhaustedError",
    "BackendError",
    "DriverError",
    "UnsupportedError",
    "BufferTooSmallError",
    "PanicError",
    "InternalError",
    "version",
    "library",
]

library = _lib.load()
"""The loaded ``ctypes.CDLL``."""


def version() -> str:
    """The library's version string."""
    return library.kvvm_version().decode()


# ---------------------------------------------------------------------------------------------
# Errors


class KvvmError(Exception):
    """A failed kvvm call: ``status`` (the numeric ``kvvm_status``), ``status_name`` and the
    library's message."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.status_name = library.kvvm_status_name(status).decode()
        self.message = message
        super().__init__(f"{self.status_name}: {message}")


class NullPointerError(KvvmError):
    """KVVM_STATUS_NULL_POINTER (a binding bug)."""


class InvalidHandleError(KvvmError):
    """KVVM_STATUS_INVALID_HANDLE: the object was closed."""


class InvalidArgumentError(KvvmError, ValueError):
    """KVVM_STATUS_INVALID_ARGUMENT."""


class InvalidConfigError(KvvmError, ValueError):
    """KVVM_STATUS_INVALID_CONFIG."""


class BudgetExhaustedError(KvvmError, MemoryError):
    """KVVM_STATUS_BUDGET_EXHAUSTED: the page budget cannot supply the pages; nothing changed."""


class SlotsExhaustedError(KvvmError):
    """KVVM_STATUS_SLOTS_EXHAUSTED: every slot is allocated."""


class HostBudgetExhaustedError(KvvmError, MemoryError):
    """KVVM_STATUS_HOST_BUDGET_EXHAUSTED."""


class MapCountExhaustedError(KvvmError, MemoryError):
    """KVVM_STATUS_MAP_COUNT_EXHAUSTED."""


class BackendError(KvvmError, OSError):
    """KVVM_STATUS_BACKEND_ERROR: a system or driver call failed."""


class DriverError(KvvmError):
    """KVVM_STATUS_DRIVER_ERROR: the CUDA driver could not be used."""


class UnsupportedError(KvvmError):
    """KVVM_STATUS_UNSUPPORTED."""


class BufferTooSmallError(KvvmError):
    """KVVM_STATUS_BUFFER_TOO_SMALL."""


class PanicError(KvvmError):
    """KVVM_STATUS_PANIC: a bug inside kvvm was caught at the boundary."""


class InternalError(KvvmError):
    """KVVM_STATUS_INTERNAL, or a status this binding does not know."""


_ERRORS = {
    1: NullPointerError,
    2: InvalidHandleError,
    3: InvalidArgumentError,
    4: InvalidConfigError,
    5: BudgetExhaustedError,
    6: SlotsExhaustedError,
    7: HostBudgetExhaustedError,
    8: MapCountExhaustedError,
    9: BackendError,
    10: DriverError,
    11: UnsupportedError,
    12: BufferTooSmallError,
    13: PanicError,
    14: InternalError,
}


def _last_error() -> str:
    n = library.kvvm_last_error(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    library.kvvm_last_error(buf, n + 1)
    return buf.value.decode(errors="replace")


def _check(status: int) -> None:
    if status != 0:
        raise _ERRORS.get(status, InternalError)(status, _last_error())


# ---------------------------------------------------------------------------------------------
# Codes

_DTYPES = {"f16": 0, "float16": 0, "bf16": 1, "bfloat16": 1, "f32": 2, "float32": 2,
           "fp8-e4m3": 3, "fp8-e5m2": 4}
_DTYPE_NAMES = {0: "f16", 1: "bf16", 2: "f32", 3: "fp8-e4m3", 4: "fp8-e5m2"}
_LAYOUTS = {"interleaved": 0, "per-layer": 1}
_BACKENDS = {"auto": 0, "host": 1, "cuda": 2}
_KV = {"k": 0, "v": 1, 0: 0, 1: 1}


def _code(table: Mapping, value, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in table.values():
        return value
    key = value.lower().replace("_", "-") if isinstance(value, str) else value
    try:
        return table[key]
    except KeyError:
        raise InvalidConfigError(4, f"unknown {what} {value!r} (known: {sorted(set(map(str, table)))})") from None


def _kv(kv) -> int:
    k = kv.lower() if isinstance(kv, str) else kv
    if k not in _KV:
        raise InvalidArgumentError(3, f"kv must be 'k' or 'v', got {kv!r}")
    return _KV[k]


# ---------------------------------------------------------------------------------------------
# DLPack capsules

_Destructor = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _Destructor]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

# PyCapsule keeps the name pointer, not a copy: these must live as long as the module.
_VERSIONED = b"dltensor_versioned"
_LEGACY = b"dltensor"


def _make_destructor(name: bytes, free):
    @_Destructor
    def destructor(capsule):
        # A capsule that was never consumed still carries its name: the tensor is ours to free.
        # A consumer renames it ("used_...") and calls the deleter itself.
        try:
            if _capsule_is_valid(capsule, name):
                free(_capsule_pointer(capsule, name))
        except Exception:  # at interpreter shutdown the module may be half torn down
            pass

    return destructor


_versioned_destructor = _make_destructor(_VERSIONED, library.kvvm_dlpack_free)
_legacy_destructor = _make_destructor(_LEGACY, library.kvvm_dlpack_free_legacy)


class View:
    """Layer ``layer``'s K or V, exportable through DLPack (``numpy.from_dlpack(view)``,
    ``torch.from_dlpack(view)``).

    With ``slot=None`` the whole batch ``[max_slots, max_tokens, kv_heads, head_dim]``: only the
    tokens a slot has mapped may be touched (printing such an array reads unmapped memory and
    crashes). With a slot, its first ``tokens`` tokens ``[tokens, kv_heads, head_dim]``, which
    must be mapped when the view is exported. Each exported tensor keeps the cache's memory
    reserved until it is garbage collected, even after ``Cache.close()``; its contents are valid
    as long as the slot holds those tokens.
    """

    def __init__(self, cache: "Cache", layer: int, kv, slot: int | None, tokens: int | None):
        self._cache = cache
        self.layer = layer
        self.kv = _kv(kv)
        self.slot = ALL_SLOTS if slot is None else slot
        if slot is not None and tokens is None:
            tokens = cache.tokens(slot)
        self.tokens = tokens or 0
        info = cache.layer_view(layer, kv)
        self.dtype = info["dtype"]
        self._device = (info["device_type"], info["device_id"])

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("kvvm views cannot be copied by the producer")
        if dl_device is not None and tuple(dl_device) != self._device:
            raise BufferError(f"the view lives on device {self._device}, not {tuple(dl_device)}")
        h = self._cache._handle_checked()
        if max_version is not None and max_version[0] >= 1:
            out = ctypes.POINTER(_lib.DLManagedTensorVersioned)()
            _check(library.kvvm_cache_export_dlpack(
                h, self.layer, self.kv, self.slot, self.tokens, ctypes.byref(out)))
            ptr = ctypes.cast(out, ctypes.c_void_p).value
            try:
                return _capsule_new(ptr, _VERSIONED, _versioned_destructor)
            except BaseException:
                library.kvvm_dlpack_free(ptr)
                raise
        out = ctypes.POINTER(_lib.DLManagedTensor)()
        _check(library.kvvm_cache_export_dlpack_legacy(
            h, self.layer, self.kv, self.slot, self.tokens, ctypes.byref(out)))
        ptr = ctypes.cast(out, ctypes.c_void_p).value
        try:
            return _capsule_new(ptr, _LEGACY, _legacy_destructor)
        except BaseException:
            library.kvvm_dlpack_free_legacy(ptr)
            raise


# ---------------------------------------------------------------------------------------------
# Cache


class Cache:
    """A KV cache of contiguous virtual tensors (``kvvm_cache``).

    Give ``model`` (a preset name such as ``"llama-3-8b"`` or ``"llama-3-70b@tp4"``) or the
    shapes ``layers``, ``kv_heads``, ``head_dim``; keyword arguments override the preset's.
    Thread-safe like the C ABI. ``close()`` (or leaving a ``with`` block) destroys the handle;
    exported tensors and swap engines keep the memory alive until they are gone.
    """

    def __init__(self, model: str | None = None, *, max_slots: int, max_tokens: int,
                 budget_bytes: int, layers: int | None = None, kv_heads: int | None = None,
                 head_dim: int | None = None, dtype="f16", layout="interleaved", page_size: int = 0,
                 backend="auto", host_granularity: int = 0, device: int = 0,
                 lookahead_steps: int = 8, copy_threads: int = 0, create_all_pages: bool = False):
        self._handle = None
        cfg = _lib.Config()
        if model is not None:
            _check(library.kvvm_config_preset(model.encode(), max_slots, max_tokens, budget_bytes,
                                              ctypes.byref(cfg)))
        else:
            _check(library.kvvm_config_init(ctypes.byref(cfg)))
            cfg.max_slots, cfg.max_tokens, cfg.budget_bytes = max_slots, max_tokens, budget_bytes
        for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if value is not None:
                setattr(cfg, name, value)
        cfg.dtype = _code(_DTYPES, dtype, "dtype")
        cfg.layout = _code(_LAYOUTS, layout, "layout")
        cfg.backend = _code(_BACKENDS, backend, "backend")
        cfg.page_size = page_size
        cfg.host_granularity = host_granularity
        cfg.device = device
        cfg.lookahead_steps = lookahead_steps
        cfg.copy_threads = copy_threads
        cfg.create_all_pages = int(create_all_pages)
        h = _lib.CacheHandle()
        _check(library.kvvm_cache_create(ctypes.byref(cfg), ctypes.byref(h)))
        self._handle = h
        self.layers, self.kv_heads, self.head_dim = cfg.layers, cfg.kv_heads, cfg.head_dim
        self.max_slots, self.max_tokens = cfg.max_slots, cfg.max_tokens

    # lifetime
    def _handle_checked(self):
        if self._handle is None:
            raise InvalidHandleError(2, "the cache is closed")
        return self._handle

    def close(self) -> None:
        """Destroys the handle (idempotent)."""
        h, self._handle = self._handle, None
        if h is not None:
            _check(library.kvvm_cache_free(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # slots
    def alloc_slot(self, tokens: int | None = None) -> int:
        """A free slot; with ``tokens``, the one whose mapped pages best fit that many."""
        out = ctypes.c_uint32()
        if tokens is None:
            _check(library.kvvm_cache_alloc_slot(self._handle_checked(), ctypes.byref(out)))
        else:
            _check(library.kvvm_cache_alloc_slot_for(self._handle_checked(), tokens,
                                                     ctypes.byref(out)))
        return out.value

    def slot(self, tokens: int | None = None) -> "Slot":
        """Allocates a slot (see :meth:`alloc_slot`) wrapped in a :class:`Slot`; with ``tokens``
        it is also grown to hold that many."""
        s = Slot(self, self.alloc_slot(tokens))
        if tokens:
            try:
                s.ensure(tokens)
            except BaseException:
                s.free()
                raise
        return s

    def free_slot(self, slot: int) -> None:
        _check(library.kvvm_cache_free_slot(self._handle_checked(), slot))

    def ensure(self, slot: int, tokens: int) -> None:
        """Makes ``slot`` hold ``tokens`` tokens (all or nothing)."""
        _check(library.kvvm_cache_ensure(self._handle_checked(), slot, tokens))

    def step(self, batch: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """``ensure`` for a batch of ``{slot: tokens}`` or ``(slot, tokens)`` pairs."""
        pairs = list(batch.items() if isinstance(batch, Mapping) else batch)
        arr = (_lib.SlotTokens * max(len(pairs), 1))()
        for i, (s, t) in enumerate(pairs):
            arr[i].slot, arr[i].tokens = s, t
        _check(library.kvvm_cache_step(self._handle_checked(), arr, len(pairs)))

    def shrink(self, slot: int, tokens: int) -> None:
        _check(library.kvvm_cache_shrink(self._handle_checked(), slot, tokens))

    def tokens(self, slot: int) -> int:
        out = ctypes.c_uint64()
        _check(library.kvvm_cache_tokens(self._handle_checked(), slot, ctypes.byref(out)))
        return out.value

    def capacity(self, slot: int) -> int:
        out = ctypes.c_uint64()
        _check(library.kvvm_cache_capacity(self._handle_checked(), slot, ctypes.byref(out)))
        return out.value

    # views
    def layer_view(self, layer: int, kv) -> dict:
        """The raw view description: ``data`` (address), ``shape``, ``strides`` (elements),
        ``dtype``, ``itemsize``, ``device_type``, ``device_id``."""
        v = _lib.View()
        _check(library.kvvm_cache_layer_view(self._handle_checked(), layer, _kv(kv),
                                             ctypes.byref(v)))
        return {
            "data": v.data or 0,
            "shape": tuple(v.shape[: v.ndim]),
            "strides": tuple(v.strides[: v.ndim]),
            "dtype": _DTYPE_NAMES.get(v.dtype, str(v.dtype)),
            "itemsize": v.itemsize,
            "device_type": v.device_type,
            "device_id": v.device_id,
        }

    def view(self, layer: int, kv, slot: int | None = None, tokens: int | None = None) -> View:
        """A DLPack-exportable view (see :class:`View`); ``tokens`` defaults to the slot's."""
        return View(self, layer, kv, slot, tokens)

    def slot_ranges(self, slot: int, tokens: int) -> list[tuple[int, int]]:
        """(address, length) of the byte ranges holding the slot's first ``tokens`` tokens."""
        h = self._handle_checked()
        count = ctypes.c_size_t()
        st = library.kvvm_cache_slot_ranges(h, slot, tokens, None, 0, ctypes.byref(count))
        if st != 12:
            _check(st)
        arr = (_lib.Range * count.value)()
        _check(library.kvvm_cache_slot_ranges(h, slot, tokens, arr, count.value,
                                              ctypes.byref(count)))
        return [(r.addr, r.len) for r in arr[: count.value]]

    def row(self, slot: int, token: int, layer: int, kv) -> tuple[int, int]:
        """(address, length) of one token's ``[kv_heads, head_dim]`` row (checked mapped)."""
        r = _lib.Range()
        _check(library.kvvm_cache_row(self._handle_checked(), slot, token, layer, _kv(kv),
                                      ctypes.byref(r)))
        return r.addr, r.len

    def read_row(self, slot: int, token: int, layer: int, kv) -> bytes:
        """A copy of one row's bytes, made by the library (host backend)."""
        _, n = self.row(slot, token, layer, kv)
        buf = ctypes.create_string_buffer(n)
        _check(library.kvvm_cache_read_row(self._handle_checked(), slot, token, layer, _kv(kv),
                                           buf, n))
        return buf.raw

    def write_row(self, slot: int, token: int, layer: int, kv, data: bytes) -> None:
        """Writes one row's bytes through the library (host backend)."""
        data = bytes(data)
        _check(library.kvvm_cache_write_row(self._handle_checked(), slot, token, layer, _kv(kv),
                                            data, len(data)))

    def stats(self) -> dict:
        s = _lib.Stats(struct_size=ctypes.sizeof(_lib.Stats))
        _check(library.kvvm_cache_stats(self._handle_checked(), ctypes.byref(s)))
        return {name: getattr(s, name) for name, _ in _lib.Stats._fields_ if name != "struct_size"}

    def quiesce(self) -> None:
        """Waits until the background mapper is idle."""
        _check(library.kvvm_cache_quiesce(self._handle_checked()))


class Slot:
    """One request's slot of a :class:`Cache`: ``id`` plus the per-slot calls. ``free()`` (or
    leaving a ``with`` block) frees it; it is not freed on garbage collection (a slot is freed
    by the engine's scheduling, not by Python's)."""

    def __init__(self, cache: Cache, slot_id: int):
        self.cache = cache
        self.id = slot_id

    def __repr__(self):
        return f"Slot({self.id})"

    def __int__(self):
        return self.id

    def ensure(self, tokens: int) -> None:
        self.cache.ensure(self.id, tokens)

    def shrink(self, tokens: int) -> None:
        self.cache.shrink(self.id, tokens)

    @property
    def tokens(self) -> int:
        return self.cache.tokens(self.id)

    @property
    def capacity(self) -> int:
        return self.cache.capacity(self.id)

    def view(self, layer: int, kv, tokens: int | None = None) -> View:
        """This slot's first ``tokens`` (default: all) tokens of layer ``layer``'s K or V."""
        return self.cache.view(layer, kv, slot=self.id, tokens=tokens)

    def free(self) -> None:
        self.cache.free_slot(self.id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


# ---------------------------------------------------------------------------------------------
# Swap


class Ticket:
    """A swap transfer in flight (``kvvm_ticket``). Closing it does not cancel the transfer."""

    def __init__(self, handle):
        self._handle = handle

    def _h(self):
        if self._handle is None:
            raise InvalidHandleError(2, "the ticket is closed")
        return self._handle

    def poll(self) -> bool:
        """True once complete; raises the transfer's error if it failed."""
        done = ctypes.c_uint32()
        _check(library.kvvm_ticket_poll(self._h(), ctypes.byref(done)))
        return bool(done.value)

    def wait(self) -> None:
        _check(library.kvvm_ticket_wait(self._h()))

    @property
    def event(self) -> int | None:
        """The CUDA event recorded after the copy (``CUevent`` as an int), None on host."""
        out = ctypes.c_uint64()
        _check(library.kvvm_ticket_event(self._h(), ctypes.byref(out)))
        return out.value or None

    @property
    def copy(self) -> int:
        """The host copy's id."""
        out = ctypes.c_uint64()
        _check(library.kvvm_ticket_copy(self._h(), ctypes.byref(out)))
        return out.value

    @property
    def bytes(self) -> int:
        out = ctypes.c_uint64()
        _check(library.kvvm_ticket_bytes(self._h(), ctypes.byref(out)))
        return out.value

    def close(self) -> None:
        h, self._handle = self._handle, None
        if h is not None:
            _check(library.kvvm_ticket_free(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SwapEngine:
    """Asynchronous swapping of whole slots to host memory (``kvvm_swap``)."""

    def __init__(self, cache: Cache, *, host_budget_bytes: int | None = None,
                 chunk_bytes: int | None = None, max_in_flight: int | None = None):
        cfg = _lib.SwapConfig()
        _check(library.kvvm_swap_config_init(ctypes.byref(cfg)))
        if host_budget_bytes is not None:
            cfg.host_budget_bytes = host_budget_bytes
        if chunk_bytes is not None:
            cfg.chunk_bytes = chunk_bytes
        if max_in_flight is not None:
            cfg.max_in_flight = max_in_flight
        self._handle = None
        h = _lib.SwapHandle()
        _check(library.kvvm_swap_create(cache._handle_checked(), ctypes.byref(cfg),
                                        ctypes.byref(h)))
        self._handle = h

    def _h(self):
        if self._handle is None:
            raise InvalidHandleError(2, "the swap engine is closed")
        return self._handle

    def swap_out(self, slot: int) -> Ticket:
        t = _lib.TicketHandle()
        _check(library.kvvm_swap_out(self._h(), slot, ctypes.byref(t)))
        return Ticket(t)

    def swap_in(self, copy: int, slot: int) -> Ticket:
        t = _lib.TicketHandle()
        _check(library.kvvm_swap_in(self._h(), copy, slot, ctypes.byref(t)))
        return Ticket(t)

    def release(self, copy: int) -> None:
        _check(library.kvvm_swap_release(self._h(), copy))

    def pin(self, copy: int, pinned: bool = True) -> None:
        _check(library.kvvm_swap_pin(self._h(), copy, int(pinned)))

    def set_priority(self, copy: int, priority: int) -> None:
        _check(library.kvvm_swap_set_priority(self._h(), copy, priority))

    def host_tokens(self, copy: int) -> int:
        out = ctypes.c_uint64()
        _check(library.kvvm_swap_host_tokens(self._h(), copy, ctypes.byref(out)))
        return out.value

    def stats(self) -> dict:
        s = _lib.SwapStats(struct_size=ctypes.sizeof(_lib.SwapStats))
        _check(library.kvvm_swap_get_stats(self._h(), ctypes.byref(s)))
        return {n: getattr(s, n) for n, _ in _lib.SwapStats._fields_
                if n not in ("struct_size", "reserved")}

    def quiesce(self) -> None:
        _check(library.kvvm_swap_quiesce(self._h()))

    def close(self) -> None:
        h, self._handle = self._handle, None
        if h is not None:
            _check(library.kvvm_swap_free(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# Ordering with the caller's CUDA streams (docs/ordering.md). Streams and events are plain
# integers: a ``CUstream`` / ``CUevent`` handle value, or an object with ``cuda_stream`` /
# ``cuda_event`` (torch.cuda.Stream, torch.cuda.Event); 0 is the legacy default stream. The host
# backend has no streams: setting one changes nothing, and a stream wait waits for the copies.

def _handle_int(value, attr: str, what: str) -> int:
    if hasattr(value, attr):
        value = getattr(value, attr)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int or have .{attr}, not {type(value).__name__}")
    if not 0 <= value < 1 << 64:
        raise OverflowError(f"{what} {value} is out of range for a 64-bit handle")
    return value


def _cache_set_stream(self, stream) -> None:
    """Orders kvvm's swap-out copies and unmaps after the work queued on ``stream`` (the
    engine's compute stream) before each call that needs it."""
    _check(library.kvvm_cache_set_stream(self._handle_checked(),
                                         _handle_int(stream, "cuda_stream", "stream")))


def _ticket_stream_wait(self, stream) -> None:
    """Makes ``stream`` wait on the device for this transfer: kernels enqueued on it afterwards
    may use the swapped-in slot, without the host waiting."""
    _check(library.kvvm_ticket_stream_wait(self._h(),
                                           _handle_int(stream, "cuda_stream", "stream")))


def _swap_out_after(self, slot: int, event) -> Ticket:
    """``swap_out`` with the copies ordered after ``event`` (recorded after the kernels that
    write the slot) instead of after the cache's stream."""
    t = _lib.TicketHandle()
    _check(library.kvvm_swap_out_after(self._h(), slot, _handle_int(event, "cuda_event", "event"),
                                       ctypes.byref(t)))
    return Ticket(t)


Cache.set_stream = _cache_set_stream
Ticket.stream_wait = _ticket_stream_wait
SwapEngine.swap_out_after = _swap_out_after
