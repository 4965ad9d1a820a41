"""Python binding of kvvm (KV-cache virtual memory for LLM serving) over its C ABI.

A ctypes layer over ``libkvvm.so``, no compiled extension. The library is loaded on first use
(``import kvvm`` never fails): the one bundled in the installed package (``pip install ./python``),
else the file named by ``KVVM_LIBRARY``, else a source checkout's ``target/{release,debug}``.

>>> import numpy as np, kvvm
>>> cache = kvvm.Cache(model="llama-3-8b", layers=2, max_slots=4, max_tokens=1024,
...                    budget_bytes=64 << 20, backend="host", host_granularity=64 << 10)
>>> slot = cache.alloc_slot()
>>> cache.ensure(slot, 100)
>>> k0 = np.from_dlpack(cache.view(0, "k", slot=slot, tokens=100))  # [100, kv_heads, head_dim]
>>> k0[:] = 1.0

Memory model, seen from Python
------------------------------
* **Views share memory.** Arrays made from :meth:`Cache.view` are the cache's memory, not copies.
  A slot's tokens ``[0, tokens(slot))`` are mapped and may be read and written. Rows past them,
  slots that are free, shrunk or swapped out, and the whole-batch view outside mapped tokens are
  unmapped: reading them may fault (kill the process with SIGSEGV) or read zeros, depending on
  whether the backend maps a zero page there; writing them faults. Do not print a whole-batch view.
* **After** ``shrink``, ``free_slot`` or a completed ``swap_out`` of a slot, arrays over its tokens
  no longer hold that request's data (the pages may belong to another request).
* **Threads.** Every call is thread-safe on its own (the library serializes what must be); a
  sequence of calls is not atomic. Do not touch a slot's array while a swap of that slot is in
  flight, or after freeing it.
* **fork.** A child process must not use kvvm objects inherited from its parent (their calls fail
  in the child; the parent's data is not affected). Create new objects in the child.
* **Integers** are range-checked before they reach C: out-of-range values raise ``OverflowError``,
  bools ``TypeError``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Union

from . import _lib
from ._lib import ALL_SLOTS
from ._version import __version__

__all__ = [
    "__version__",
    "ALL_SLOTS",
    "KV",
    "Status",
    "Cache",
    "CacheStats",
    "LayerView",
    "Slot",
    "View",
    "SwapEngine",
    "SwapStats",
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
    "library_path",
]

KV = Union[Literal["k", "v"], int]
"""Which half of a layer's cache: ``"k"`` or ``"v"`` (or ``0`` / ``1``)."""

DTypeLike = Union[str, Any]
"""A dtype: a name (``"f16"``, ``"bfloat16"``, ...), a ``torch.dtype`` or a numpy dtype."""


def __getattr__(name: str):
    # ``kvvm.library`` (the ``ctypes.CDLL``) is loaded on first access, not at import.
    if name == "library":
        return _lib.get()
    raise AttributeError(f"module 'kvvm' has no attribute {name!r}")


def version() -> str:
    """The loaded library's version string (``kvvm.__version__`` is the package's)."""
    return _lib.get().kvvm_version().decode()


def library_path() -> str:
    """The path of the shared library this process uses (loading it if needed)."""
    _lib.get()
    return str(_lib.loaded_path())


# ---------------------------------------------------------------------------------------------
# Integer arguments: checked here, so that ctypes never wraps them


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be an integer, not a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise OverflowError(f"{name}={v} is out of range [{lo}, {hi}]")
    return v


_U32_MAX, _U64_MAX, _I32_MIN, _I32_MAX = 2**32 - 1, 2**64 - 1, -(2**31), 2**31 - 1
_SIZE_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_size_t)) - 1


def _u32(value: Any, name: str) -> int:
    return _int(value, name, 0, _U32_MAX)


def _u64(value: Any, name: str) -> int:
    return _int(value, name, 0, _U64_MAX)


def _i32(value: Any, name: str) -> int:
    return _int(value, name, _I32_MIN, _I32_MAX)


def _slot(value: Any) -> int:
    """A slot index (``ALL_SLOTS`` is accepted only where the call says so)."""
    return _u32(value, "slot")


# ---------------------------------------------------------------------------------------------
# Status codes and errors


class Status(enum.IntEnum):
    """``kvvm_status`` values (stable)."""

    OK = 0
    NULL_POINTER = 1
    INVALID_HANDLE = 2
    INVALID_ARGUMENT = 3
    INVALID_CONFIG = 4
    BUDGET_EXHAUSTED = 5
    SLOTS_EXHAUSTED = 6
    HOST_BUDGET_EXHAUSTED = 7
    MAP_COUNT_EXHAUSTED = 8
    BACKEND_ERROR = 9
    DRIVER_ERROR = 10
    UNSUPPORTED = 11
    BUFFER_TOO_SMALL = 12
    PANIC = 13
    INTERNAL = 14


class KvvmError(Exception):
    """A failed kvvm call: ``status`` (a :class:`Status`, or the raw number for a status this
    binding does not know), ``status_name`` (``"KVVM_STATUS_..."``) and the library's ``message``."""

    def __init__(self, status: int, message: str):
        try:
            self.status: Status | int = Status(status)
            self.status_name = f"KVVM_STATUS_{self.status.name}"
        except ValueError:
            self.status = status
            self.status_name = f"KVVM_STATUS_{status}"
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


_ERRORS: dict[int, type[KvvmError]] = {
    Status.NULL_POINTER: NullPointerError,
    Status.INVALID_HANDLE: InvalidHandleError,
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.INVALID_CONFIG: InvalidConfigError,
    Status.BUDGET_EXHAUSTED: BudgetExhaustedError,
    Status.SLOTS_EXHAUSTED: SlotsExhaustedError,
    Status.HOST_BUDGET_EXHAUSTED: HostBudgetExhaustedError,
    Status.MAP_COUNT_EXHAUSTED: MapCountExhaustedError,
    Status.BACKEND_ERROR: BackendError,
    Status.DRIVER_ERROR: DriverError,
    Status.UNSUPPORTED: UnsupportedError,
    Status.BUFFER_TOO_SMALL: BufferTooSmallError,
    Status.PANIC: PanicError,
    Status.INTERNAL: InternalError,
}


def _last_error() -> str:
    lib = _lib.get()
    n = lib.kvvm_last_error(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.kvvm_last_error(buf, n + 1)
    return buf.value.decode(errors="replace")


def _check(status: int) -> None:
    if status != Status.OK:
        raise _ERRORS.get(status, InternalError)(status, _last_error())


# ---------------------------------------------------------------------------------------------
# Codes

_DTYPES = {"f16": 0, "float16": 0, "half": 0, "bf16": 1, "bfloat16": 1, "f32": 2, "float32": 2,
           "float": 2, "fp8-e4m3": 3, "float8-e4m3fn": 3, "float8-e4m3": 3, "fp8-e5m2": 4,
           "float8-e5m2": 4}
_DTYPE_NAMES = {0: "f16", 1: "bf16", 2: "f32", 3: "fp8-e4m3", 4: "fp8-e5m2"}
_LAYOUTS = {"interleaved": 0, "per-layer": 1}
_BACKENDS = {"auto": 0, "host": 1, "cuda": 2}


def _code(table: Mapping[str, int], value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a name, not a bool")
    if isinstance(value, int):
        if value in table.values():
            return value
        raise InvalidConfigError(Status.INVALID_CONFIG, f"unknown {what} code {value}")
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a name, not {type(value).__name__}")
    try:
        return table[value.lower().replace("_", "-")]
    except KeyError:
        raise InvalidConfigError(
            Status.INVALID_CONFIG, f"unknown {what} {value!r} (known: {sorted(table)})") from None


def _dtype_name(dtype: DTypeLike) -> str:
    """A dtype's name for :data:`_DTYPES`: strings as given, ``torch.float16`` as
    ``"float16"``, numpy dtypes and scalar types by their ``numpy.dtype(...).name``."""
    if isinstance(dtype, str):
        return dtype
    if type(dtype).__module__ == "torch" and str(dtype).startswith("torch."):
        return str(dtype)[len("torch."):]
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            return np.dtype(dtype).name
        except TypeError:
            pass
    raise TypeError(f"dtype must be a name, a torch dtype or a numpy dtype, not {dtype!r}")


def _dtype_code(dtype: DTypeLike) -> int:
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return _code(_DTYPES, dtype, "dtype")
    return _code(_DTYPES, _dtype_name(dtype), "dtype")


def _kv(kv: Any) -> int:
    if isinstance(kv, bool):
        raise TypeError("kv must be 'k' or 'v', not a bool")
    k = kv.lower() if isinstance(kv, str) else kv
    if k in ("k", 0):
        return 0
    if k in ("v", 1):
        return 1
    raise InvalidArgumentError(Status.INVALID_ARGUMENT, f"kv must be 'k' or 'v', got {kv!r}")


# ---------------------------------------------------------------------------------------------
# Handles: one lifecycle for caches, swap engines and tickets


class _Handle:
    """Owns one library handle: ``close()`` (idempotent), ``with`` blocks and garbage
    collection destroy it."""

    _what = "object"
    _destroy_fn = ""
    _handle: Any = None

    def _h(self):
        h = self._handle
        if h is None:
            raise InvalidHandleError(Status.INVALID_HANDLE, f"the {self._what} is closed")
        return h

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Destroys the handle (idempotent)."""
        h, self._handle = self._handle, None
        if h is not None:
            _check(getattr(_lib.get(), self._destroy_fn)(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter shutdown the module may be half torn down
            pass


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


def _make_destructor(name: bytes, free_name: str):
    @_Destructor
    def destructor(capsule):
        # A capsule that was never consumed still carries its name: the tensor is ours to free.
        # A consumer renames it ("used_...") and calls the deleter itself.
        try:
            if _capsule_is_valid(capsule, name):
                getattr(_lib.get(), free_name)(_capsule_pointer(capsule, name))
        except Exception:  # at interpreter shutdown the module may be half torn down
            pass

    return destructor


_versioned_destructor = _make_destructor(_VERSIONED, "kvvm_dlpack_free")
_legacy_destructor = _make_destructor(_LEGACY, "kvvm_dlpack_free_legacy")


@dataclass(frozen=True)
class LayerView:
    """The raw description of layer ``layer``'s K or V for the whole batch
    (:meth:`Cache.layer_view`): ``data`` (address), ``shape``, ``strides`` (elements)."""

    data: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    itemsize: int
    device_type: int
    device_id: int


@dataclass(frozen=True)
class View:
    """Layer ``layer``'s K or V, exportable through DLPack (``numpy.from_dlpack(view)``,
    ``torch.from_dlpack(view)``); made by :meth:`Cache.view`.

    With ``slot == ALL_SLOTS`` the whole batch ``[max_slots, max_tokens, kv_heads, head_dim]``:
    only the tokens a slot has mapped may be touched (see the module's memory model). With a
    slot, its first ``tokens`` tokens ``[tokens, kv_heads, head_dim]``, which must be mapped when
    the view is exported. Each exported tensor keeps the cache's memory reserved until it is
    garbage collected, even after ``Cache.close()``; its contents are valid as long as the slot
    holds those tokens.
    """

    cache: "Cache" = dataclasses.field(repr=False)
    layer: int
    kv: int
    slot: int
    tokens: int
    dtype: str
    device: tuple[int, int]

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: Any = None, copy: bool | None = None):
        if copy:
            raise BufferError("kvvm views cannot be copied by the producer")
        if dl_device is not None and tuple(dl_device) != self.device:
            raise BufferError(f"the view lives on device {self.device}, not {tuple(dl_device)}")
        lib = _lib.get()
        h = self.cache._h()
        if max_version is not None and max_version[0] >= 1:
            out = ctypes.POINTER(_lib.DLManagedTensorVersioned)()
            _check(lib.kvvm_cache_export_dlpack(
                h, self.layer, self.kv, self.slot, self.tokens, ctypes.byref(out)))
            ptr = ctypes.cast(out, ctypes.c_void_p).value
            try:
                return _capsule_new(ptr, _VERSIONED, _versioned_destructor)
            except BaseException:
                lib.kvvm_dlpack_free(ptr)
                raise
        legacy = ctypes.POINTER(_lib.DLManagedTensor)()
        _check(lib.kvvm_cache_export_dlpack_legacy(
            h, self.layer, self.kv, self.slot, self.tokens, ctypes.byref(legacy)))
        ptr = ctypes.cast(legacy, ctypes.c_void_p).value
        try:
            return _capsule_new(ptr, _LEGACY, _legacy_destructor)
        except BaseException:
            lib.kvvm_dlpack_free_legacy(ptr)
            raise


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a cache's counters (``kvvm_stats``)."""

    allocated_slots: int
    mapped_bytes: int
    live_bytes: int
    page_size: int
    budget_pages: int
    pool_live_pages: int
    pool_free_pages: int
    pool_in_use_pages: int
    pages_created: int
    pages_released: int
    backend_calls: int
    foreground_calls: int
    mapper_batches: int
    mapper_pages: int
    reclaimed_pages: int


@dataclass(frozen=True)
class SwapStats:
    """A snapshot of a swap engine's counters (``kvvm_swap_stats``)."""

    bytes_out: int
    bytes_in: int
    reuse_saved_bytes: int
    transfers: int
    host_bytes_used: int
    host_budget_bytes: int
    evictions: int
    copies_live: int
    in_flight: int


def _from_struct(cls, struct):
    return cls(**{f.name: getattr(struct, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------
# Cache


def _hf_shapes(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers model config (its text config for
    multimodal models)."""
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            config = get_text(decoder=True)
        except TypeError:
            config = get_text()
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class Cache(_Handle):
    """A KV cache of contiguous virtual tensors (``kvvm_cache``).

    Give ``model`` (a preset name such as ``"llama-3-8b"`` or ``"llama-3-70b@tp4"``) or the
    shapes ``layers``, ``kv_heads``, ``head_dim`` (or use :meth:`from_hf_config`); keyword
    arguments override the preset's. ``dtype`` is a name (``"f16"``, ``"bf16"``, ``"f32"``,
    ``"fp8-e4m3"``, ``"fp8-e5m2"``), a ``torch.dtype`` or a numpy dtype. Thread-safe like the C
    ABI. ``close()`` (or leaving a ``with`` block, or garbage collection) destroys the handle;
    swap engines keep the whole cache alive until they are gone; exported tensors keep only the
    mapped memory they describe (the cache's threads stop and its files close at ``close()``).
    """

    _what = "cache"
    _destroy_fn = "kvvm_cache_free"

    def __init__(self, model: str | None = None, *, max_slots: int, max_tokens: int,
                 budget_bytes: int, layers: int | None = None, kv_heads: int | None = None,
                 head_dim: int | None = None, dtype: DTypeLike = "f16",
                 layout: Literal["interleaved", "per-layer"] = "interleaved",
                 page_size: int = 0, backend: Literal["auto", "host", "cuda"] = "auto",
                 host_granularity: int = 0, device: int = 0, lookahead_steps: int = 8,
                 copy_threads: int = 0, create_all_pages: bool = False):
        lib = _lib.get()
        cfg = _lib.Config()
        max_slots = _u32(max_slots, "max_slots")
        max_tokens = _u64(max_tokens, "max_tokens")
        budget_bytes = _u64(budget_bytes, "budget_bytes")
        if model is not None:
            if not isinstance(model, str):
                raise TypeError(f"model must be a preset name, not {type(model).__name__}")
            _check(lib.kvvm_config_preset(model.encode(), max_slots, max_tokens, budget_bytes,
                                          ctypes.byref(cfg)))
        else:
            _check(lib.kvvm_config_init(ctypes.byref(cfg)))
            cfg.max_slots, cfg.max_tokens, cfg.budget_bytes = max_slots, max_tokens, budget_bytes
        for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if value is not None:
                setattr(cfg, name, _u32(value, name))
        cfg.dtype = _dtype_code(dtype)
        cfg.layout = _code(_LAYOUTS, layout, "layout")
        cfg.backend = _code(_BACKENDS, backend, "backend")
        cfg.page_size = _u64(page_size, "page_size")
        cfg.host_granularity = _u64(host_granularity, "host_granularity")
        cfg.device = _i32(device, "device")
        cfg.lookahead_steps = _u32(lookahead_steps, "lookahead_steps")
        cfg.copy_threads = _u32(copy_threads, "copy_threads")
        cfg.create_all_pages = int(bool(create_all_pages))
        h = _lib.CacheHandle()
        _check(lib.kvvm_cache_create(ctypes.byref(cfg), ctypes.byref(h)))
        self._handle = h
        self.layers, self.kv_heads, self.head_dim = cfg.layers, cfg.kv_heads, cfg.head_dim
        self.max_slots, self.max_tokens = cfg.max_slots, cfg.max_tokens
        self.dtype: str = _DTYPE_NAMES[cfg.dtype]
        self.layout: str = "interleaved" if cfg.layout == 0 else "per-layer"

    @classmethod
    def from_hf_config(cls, config: Any, *, max_slots: int, max_tokens: int | None = None,
                       budget_bytes: int, dtype: DTypeLike | None = None, **kwargs) -> "Cache":
        """A cache shaped for a transformers model config: ``num_hidden_layers`` layers,
        ``num_key_value_heads`` (default ``num_attention_heads``) KV heads, ``head_dim``
        (default ``hidden_size // num_attention_heads``). ``max_tokens`` defaults to
        ``max_position_embeddings``, ``dtype`` to the config's (``dtype``/``torch_dtype``),
        else f32. Other keyword arguments as for :class:`Cache`."""
        layers, kv_heads, head_dim = _hf_shapes(config)
        if max_tokens is None:
            max_tokens = config.max_position_embeddings
        if dtype is None:
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "f32"
        return cls(max_slots=max_slots, max_tokens=max_tokens, budget_bytes=budget_bytes,
                   layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, **kwargs)

    # slots
    def alloc_slot(self, tokens: int | None = None) -> int:
        """A free slot; with ``tokens``, the one whose mapped pages best fit that many."""
        lib, out = _lib.get(), ctypes.c_uint32()
        if tokens is None:
            _check(lib.kvvm_cache_alloc_slot(self._h(), ctypes.byref(out)))
        else:
            _check(lib.kvvm_cache_alloc_slot_for(self._h(), _u64(tokens, "tokens"),
                                                 ctypes.byref(out)))
        return out.value

    def alloc_slots(self, n: int, tokens: int | None = None) -> range:
        """``n`` adjacent free slots ``range(first, first + n)``, so that a batch's
        ``[n, T, kv_heads, head_dim]`` view is a zero-copy slice of the whole-batch view.

        Allocates slots until ``n`` adjacent ones are held, then frees the others (other threads
        may briefly see those slots taken). Raises :class:`SlotsExhaustedError`, holding nothing,
        when no ``n`` adjacent slots are free."""
        n = _u32(n, "n")
        if n == 0:
            raise ValueError("n must be positive")
        held: set[int] = set()
        try:
            while True:
                s = self.alloc_slot(tokens)
                held.add(s)
                first = s
                while first - 1 in held:
                    first -= 1
                last = s
                while last + 1 in held:
                    last += 1
                if last - first + 1 >= n:
                    run = range(first, first + n)
                    break
        except SlotsExhaustedError as e:
            for s in held:
                self.free_slot(s)
            raise SlotsExhaustedError(
                Status.SLOTS_EXHAUSTED, f"no {n} adjacent free slots ({e.message})") from None
        except BaseException:
            for s in held:
                self.free_slot(s)
            raise
        for s in held:
            if s not in run:
                self.free_slot(s)
        return run

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
        _check(_lib.get().kvvm_cache_free_slot(self._h(), _slot(slot)))

    def ensure(self, slot: int, tokens: int) -> None:
        """Makes ``slot`` hold ``tokens`` tokens (all or nothing)."""
        _check(_lib.get().kvvm_cache_ensure(self._h(), _slot(slot), _u64(tokens, "tokens")))

    def step(self, batch: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """``ensure`` for a batch of ``{slot: tokens}`` or ``(slot, tokens)`` pairs (all or
        nothing)."""
        pairs = list(batch.items() if isinstance(batch, Mapping) else batch)
        arr = (_lib.SlotTokens * max(len(pairs), 1))()
        for i, (s, t) in enumerate(pairs):
            arr[i].slot, arr[i].tokens = _slot(s), _u64(t, "tokens")
        _check(_lib.get().kvvm_cache_step(self._h(), arr, len(pairs)))

    def shrink(self, slot: int, tokens: int) -> None:
        _check(_lib.get().kvvm_cache_shrink(self._h(), _slot(slot), _u64(tokens, "tokens")))

    def tokens(self, slot: int) -> int:
        out = ctypes.c_uint64()
        _check(_lib.get().kvvm_cache_tokens(self._h(), _slot(slot), ctypes.byref(out)))
        return out.value

    def capacity(self, slot: int) -> int:
        out = ctypes.c_uint64()
        _check(_lib.get().kvvm_cache_capacity(self._h(), _slot(slot), ctypes.byref(out)))
        return out.value

    # views
    def layer_view(self, layer: int, kv: KV) -> LayerView:
        """The raw description of layer ``layer``'s K or V for the whole batch."""
        v = _lib.View()
        _check(_lib.get().kvvm_cache_layer_view(self._h(), _u32(layer, "layer"), _kv(kv),
                                                ctypes.byref(v)))
        return LayerView(
            data=v.data or 0,
            shape=tuple(v.shape[: v.ndim]),
            strides=tuple(v.strides[: v.ndim]),
            dtype=_DTYPE_NAMES.get(v.dtype, str(v.dtype)),
            itemsize=v.itemsize,
            device_type=v.device_type,
            device_id=v.device_id,
        )

    def view(self, layer: int, kv: KV, slot: int | None = None,
             tokens: int | None = None) -> View:
        """A DLPack-exportable view (see :class:`View`): the whole batch without ``slot``,
        else the slot's first ``tokens`` (default: all its) tokens."""
        layer, k = _u32(layer, "layer"), _kv(kv)
        if slot is None or slot == ALL_SLOTS:
            slot, tokens = ALL_SLOTS, 0
        else:
            slot = _slot(slot)
            tokens = self.tokens(slot) if tokens is None else _u64(tokens, "tokens")
        info = self.layer_view(layer, k)
        return View(self, layer, k, slot, tokens, info.dtype, (info.device_type, info.device_id))

    def kv_views(self, slot: int | None = None,
                 tokens: int | None = None) -> list[tuple[View, View]]:
        """Every layer's ``(K, V)`` views of ``slot`` (or of the whole batch), in one call."""
        if slot is not None and slot != ALL_SLOTS and tokens is None:
            tokens = self.tokens(slot)
        return [(self.view(layer, "k", slot, tokens), self.view(layer, "v", slot, tokens))
                for layer in range(self.layers)]

    def kv_tensors(self, from_dlpack: Callable[[View], Any], slot: int | None = None,
                   tokens: int | None = None) -> list[tuple[Any, Any]]:
        """Every layer's ``(K, V)`` as tensors of a DLPack consumer, e.g.
        ``cache.kv_tensors(torch.from_dlpack)`` (the whole batch) or
        ``cache.kv_tensors(numpy.from_dlpack, slot=s)``. Zero copy."""
        return [(from_dlpack(k), from_dlpack(v)) for k, v in self.kv_views(slot, tokens)]

    def slot_ranges(self, slot: int, tokens: int) -> list[tuple[int, int]]:
        """(address, length) of the byte ranges holding the slot's first ``tokens`` tokens."""
        lib, h = _lib.get(), self._h()
        slot, tokens = _slot(slot), _u64(tokens, "tokens")
        count = ctypes.c_size_t()
        st = lib.kvvm_cache_slot_ranges(h, slot, tokens, None, 0, ctypes.byref(count))
        if st != Status.BUFFER_TOO_SMALL:
            _check(st)
        arr = (_lib.Range * count.value)()
        _check(lib.kvvm_cache_slot_ranges(h, slot, tokens, arr, count.value,
                                          ctypes.byref(count)))
        return [(r.addr, r.len) for r in arr[: count.value]]

    def row(self, slot: int, token: int, layer: int, kv: KV) -> tuple[int, int]:
        """(address, length) of one token's ``[kv_heads, head_dim]`` row (checked mapped)."""
        r = _lib.Range()
        _check(_lib.get().kvvm_cache_row(self._h(), _slot(slot), _u64(token, "token"),
                                         _u32(layer, "layer"), _kv(kv), ctypes.byref(r)))
        return r.addr, r.len

    def read_row(self, slot: int, token: int, layer: int, kv: KV) -> bytes:
        """A copy of one row's bytes, made by the library (host backend)."""
        _, n = self.row(slot, token, layer, kv)
        buf = ctypes.create_string_buffer(n)
        _check(_lib.get().kvvm_cache_read_row(self._h(), _slot(slot), _u64(token, "token"),
                                              _u32(layer, "layer"), _kv(kv), buf, n))
        return buf.raw

    def write_row(self, slot: int, token: int, layer: int, kv: KV, data: bytes) -> None:
        """Writes one row's bytes through the library (host backend)."""
        data = bytes(data)
        _check(_lib.get().kvvm_cache_write_row(self._h(), _slot(slot), _u64(token, "token"),
                                               _u32(layer, "layer"), _kv(kv), data, len(data)))

    def stats(self) -> CacheStats:
        s = _lib.Stats(struct_size=ctypes.sizeof(_lib.Stats))
        _check(_lib.get().kvvm_cache_stats(self._h(), ctypes.byref(s)))
        return _from_struct(CacheStats, s)

    def quiesce(self) -> None:
        """Waits until the background mapper is idle."""
        _check(_lib.get().kvvm_cache_quiesce(self._h()))

    # kept for code written against earlier versions of this binding
    _handle_checked = _Handle._h


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

    def __index__(self):
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

    def view(self, layer: int, kv: KV, tokens: int | None = None) -> View:
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


class Ticket(_Handle):
    """A swap transfer in flight (``kvvm_ticket``). Closing it does not cancel the transfer."""

    _what = "ticket"
    _destroy_fn = "kvvm_ticket_free"

    def __init__(self, handle):
        self._handle = handle

    def _u64_out(self, fn: str) -> int:
        out = ctypes.c_uint64()
        _check(getattr(_lib.get(), fn)(self._h(), ctypes.byref(out)))
        return out.value

    def poll(self) -> bool:
        """True once complete; raises the transfer's error if it failed."""
        done = ctypes.c_uint32()
        _check(_lib.get().kvvm_ticket_poll(self._h(), ctypes.byref(done)))
        return bool(done.value)

    def wait(self) -> None:
        _check(_lib.get().kvvm_ticket_wait(self._h()))

    @property
    def event(self) -> int | None:
        """The CUDA event recorded after the copy (``CUevent`` as an int), None on host."""
        return self._u64_out("kvvm_ticket_event") or None

    @property
    def copy(self) -> int:
        """The host copy's id."""
        return self._u64_out("kvvm_ticket_copy")

    @property
    def bytes(self) -> int:
        return self._u64_out("kvvm_ticket_bytes")


class SwapEngine(_Handle):
    """Asynchronous swapping of whole slots to host memory (``kvvm_swap``).

    :meth:`swap_out` / :meth:`swap_in` start transfers and return :class:`Ticket` s;
    :meth:`evict` / :meth:`restore` are their waiting counterparts (slot -> host copy,
    host copy -> slot)."""

    _what = "swap engine"
    _destroy_fn = "kvvm_swap_free"

    def __init__(self, cache: Cache, *, host_budget_bytes: int | None = None,
                 chunk_bytes: int | None = None, max_in_flight: int | None = None,
                 keep_pages: bool = False):
        if not isinstance(keep_pages, bool):
            raise TypeError(f"keep_pages must be a bool, not {type(keep_pages).__name__}")
        lib = _lib.get()
        cfg = _lib.SwapConfig()
        _check(lib.kvvm_swap_config_init(ctypes.byref(cfg)))
        if host_budget_bytes is not None:
            cfg.host_budget_bytes = _u64(host_budget_bytes, "host_budget_bytes")
        if chunk_bytes is not None:
            cfg.chunk_bytes = _u64(chunk_bytes, "chunk_bytes")
        if max_in_flight is not None:
            cfg.max_in_flight = _u32(max_in_flight, "max_in_flight")
        h = _lib.SwapHandle()
        _check(lib.kvvm_swap_create(cache._h(), ctypes.byref(cfg), ctypes.byref(h)))
        self._handle = h
        self.cache = cache
        if keep_pages:
            self.set_keep_pages(True)

    def set_keep_pages(self, keep: bool) -> None:
        """What swap-outs submitted from now on do with the slot's pages. ``False`` (the
        default): they are unmapped while the copy runs and go back to the pool (preemption).
        ``True``: they stay mapped to the freed slot, so a swap-in into that slot
        (``Cache.alloc_slot_for`` prefers it) is a copy alone; reclamation takes them back
        when the pool runs short (offloading while device memory is plentiful)."""
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be a bool, not {type(keep).__name__}")
        _check(_lib.get().kvvm_swap_set_keep_pages(self._h(), int(keep)))

    def swap_out(self, slot: int) -> Ticket:
        """Starts copying ``slot`` to host memory; once the ticket completes the slot is free.
        The ticket names the host copy (``ticket.copy``)."""
        t = _lib.TicketHandle()
        _check(_lib.get().kvvm_swap_out(self._h(), _slot(slot), ctypes.byref(t)))
        return Ticket(t)

    def swap_in(self, copy: int, slot: int) -> Ticket:
        """Starts copying host copy ``copy`` into ``slot`` (allocated and empty)."""
        t = _lib.TicketHandle()
        _check(_lib.get().kvvm_swap_in(self._h(), _u64(copy, "copy"), _slot(slot),
                                       ctypes.byref(t)))
        return Ticket(t)

    def evict(self, slot: int) -> int:
        """Swaps ``slot`` out and waits: returns the host copy's id; the slot is then free."""
        with self.swap_out(slot) as t:
            copy = t.copy
            t.wait()
        return copy

    def restore(self, copy: int, slot: int | None = None, *, release: bool = False) -> int:
        """Swaps host copy ``copy`` back and waits: into ``slot`` (allocated and empty), or
        into a newly allocated slot sized for the copy (freed again if the swap-in fails).
        Returns the slot. With ``release``, drops the host copy afterwards; otherwise it stays
        as a cache, so that the next swap-out of the slot copies only new tokens."""
        target = self.cache.alloc_slot(self.host_tokens(copy)) if slot is None else slot
        try:
            with self.swap_in(copy, target) as t:
                t.wait()
        except BaseException:
            if slot is None:
                self.cache.free_slot(target)
            raise
        if release:
            self.release(copy)
        return target

    def release(self, copy: int) -> None:
        _check(_lib.get().kvvm_swap_release(self._h(), _u64(copy, "copy")))

    def pin(self, copy: int, pinned: bool = True) -> None:
        _check(_lib.get().kvvm_swap_pin(self._h(), _u64(copy, "copy"), int(bool(pinned))))

    def set_priority(self, copy: int, priority: int) -> None:
        _check(_lib.get().kvvm_swap_set_priority(self._h(), _u64(copy, "copy"),
                                                 _u32(priority, "priority")))

    def host_tokens(self, copy: int) -> int:
        out = ctypes.c_uint64()
        _check(_lib.get().kvvm_swap_host_tokens(self._h(), _u64(copy, "copy"),
                                                ctypes.byref(out)))
        return out.value

    def stats(self) -> SwapStats:
        s = _lib.SwapStats(struct_size=ctypes.sizeof(_lib.SwapStats))
        _check(_lib.get().kvvm_swap_get_stats(self._h(), ctypes.byref(s)))
        return _from_struct(SwapStats, s)

    def quiesce(self) -> None:
        _check(_lib.get().kvvm_swap_quiesce(self._h()))


# ---------------------------------------------------------------------------------------------
# Ordering with the caller's CUDA streams (docs/ordering.md). Streams and events are plain
# integers: a ``CUstream`` / ``CUevent`` handle value, or an object with ``cuda_stream`` /
# ``cuda_event`` (torch.cuda.Stream, torch.cuda.Event); 0 is the legacy default stream. The host
# backend has no streams: setting one changes nothing, and a stream wait waits for the copies.

def _handle_int(value, attr: str, what: str) -> int:
    if not isinstance(value, int) and hasattr(value, attr):
        value = getattr(value, attr)
    return _u64(value, what)


def _cache_set_stream(self, stream) -> None:
    """Orders kvvm's swap-out copies and unmaps after the work queued on ``stream`` (the
    engine's compute stream) before each call that needs it."""
    _check(_lib.get().kvvm_cache_set_stream(self._h(),
                                            _handle_int(stream, "cuda_stream", "stream")))


def _ticket_stream_wait(self, stream) -> None:
    """Makes ``stream`` wait on the device for this transfer: kernels enqueued on it afterwards
    may use the swapped-in slot, without the host waiting."""
    _check(_lib.get().kvvm_ticket_stream_wait(self._h(),
                                              _handle_int(stream, "cuda_stream", "stream")))


def _swap_out_after(self, slot: int, event) -> Ticket:
    """``swap_out`` with the copies ordered after ``event`` (recorded after the kernels that
    write the slot) instead of after the cache's stream."""
    t = _lib.TicketHandle()
    _check(_lib.get().kvvm_swap_out_after(self._h(), _slot(slot),
                                          _handle_int(event, "cuda_event", "event"),
                                          ctypes.byref(t)))
    return Ticket(t)


Cache.set_stream = _cache_set_stream
Ticket.stream_wait = _ticket_stream_wait
SwapEngine.swap_out_after = _swap_out_after


# ---------------------------------------------------------------------------------------------
# Prefix sharing: Cache.alloc_slot_with_prefix, publish, ... (defined in _prefix.py)

from . import _prefix  # noqa: E402

_prefix.install(Cache, _lib.get, _check, _lib.CacheHandle)
