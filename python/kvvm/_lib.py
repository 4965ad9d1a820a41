"""Loading ``libkvvm.so`` and declaring the C ABI (``include/kvvm.h``) for ctypes."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

c_u8, c_u16, c_u32, c_i32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int32
c_u64, c_i64, c_size = ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
P = ctypes.POINTER

ALL_SLOTS = 0xFFFF_FFFF


class Handle(ctypes.Structure):
    _fields_ = [("id", c_u64)]


class CacheHandle(Handle):
    pass


class SwapHandle(Handle):
    pass


class TicketHandle(Handle):
    pass


class Config(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_u32),
        ("dtype", c_u32),
        ("layers", c_u32),
        ("kv_heads", c_u32),
        ("head_dim", c_u32),
        ("max_slots", c_u32),
        ("max_tokens", c_u64),
        ("layout", c_u32),
        ("backend", c_u32),
        ("page_size", c_u64),
        ("budget_bytes", c_u64),
        ("host_granularity", c_u64),
        ("device", c_i32),
        ("lookahead_steps", c_u32),
        ("copy_threads", c_u32),
        ("create_all_pages", c_u32),
    ]


class View(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("ndim", c_i32),
        ("dtype", c_u32),
        ("shape", c_i64 * 6),
        ("strides", c_i64 * 6),
        ("device_type", c_i32),
        ("device_id", c_i32),
        ("itemsize", c_u32),
        ("reserved", c_u32),
    ]


class SlotTokens(ctypes.Structure):
    _fields_ = [("slot", c_u32), ("reserved", c_u32), ("tokens", c_u64)]


class Range(ctypes.Structure):
    _fields_ = [("addr", c_u64), ("len", c_u64)]


class Stats(ctypes.Structure):
    _fields_ = [("struct_size", c_u32), ("allocated_slots", c_u32)] + [
        (name, c_u64)
        for name in (
            "mapped_bytes",
            "live_bytes",
            "page_size",
            "budget_pages",
            "pool_live_pages",
            "pool_free_pages",
            "pool_in_use_pages",
            "pages_created",
            "pages_released",
            "backend_calls",
            "foreground_calls",
            "mapper_batches",
            "mapper_pages",
            "reclaimed_pages",
        )
    ]


class SwapConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_u32),
        ("max_in_flight", c_u32),
        ("host_budget_bytes", c_u64),
        ("chunk_bytes", c_u64),
    ]


class SwapStats(ctypes.Structure):
    _fields_ = [("struct_size", c_u32), ("reserved", c_u32)] + [
        (name, c_u64)
        for name in (
            "bytes_out",
            "bytes_in",
            "reuse_saved_bytes",
            "transfers",
            "host_bytes_used",
            "host_budget_bytes",
            "evictions",
            "copies_live",
            "in_flight",
        )
    ]


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", c_i32), ("device_id", c_i32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", c_u8), ("bits", c_u8), ("lanes", c_u16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", c_i32),
        ("dtype", DLDataType),
        ("shape", P(c_i64)),
        ("strides", P(c_i64)),
        ("byte_offset", c_u64),
    ]


class DLVersion(ctypes.Structure):
    _fields_ = [("major", c_u32), ("minor", c_u32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DLManagedTensorVersioned._fields_ = [
    ("version", DLVersion),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, P(DLManagedTensorVersioned))),
    ("flags", c_u64),
    ("dl_tensor", DLTensor),
]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, P(DLManagedTensor))),
]

for _t, _size in (
    (Config, 80),
    (View, 128),
    (SlotTokens, 16),
    (Range, 16),
    (Stats, 120),
    (SwapConfig, 24),
    (SwapStats, 80),
    (DLTensor, 48),
    (DLManagedTensorVersioned, 80),
    (DLManagedTensor, 64),
):
    assert ctypes.sizeof(_t) == _size, (_t.__name__, ctypes.sizeof(_t))

status = c_u32

# name: (restype, argtypes)
_SIGNATURES = {
    "kvvm_version": (ctypes.c_char_p, []),
    "kvvm_status_name": (ctypes.c_char_p, [c_u32]),
    "kvvm_last_error": (c_size, [ctypes.c_char_p, c_size]),
    "kvvm_config_init": (status, [P(Config)]),
    "kvvm_config_preset": (status, [ctypes.c_char_p, c_u32, c_u64, c_u64, P(Config)]),
    "kvvm_cache_create": (status, [P(Config), P(CacheHandle)]),
    "kvvm_cache_free": (status, [CacheHandle]),
    "kvvm_cache_alloc_slot": (status, [CacheHandle, P(c_u32)]),
    "kvvm_cache_alloc_slot_for": (status, [CacheHandle, c_u64, P(c_u32)]),
    "kvvm_cache_free_slot": (status, [CacheHandle, c_u32]),
    "kvvm_cache_ensure": (status, [CacheHandle, c_u32, c_u64]),
    "kvvm_cache_step": (status, [CacheHandle, P(SlotTokens), c_size]),
    "kvvm_cache_shrink": (status, [CacheHandle, c_u32, c_u64]),
    "kvvm_cache_tokens": (status, [CacheHandle, c_u32, P(c_u64)]),
    "kvvm_cache_capacity": (status, [CacheHandle, c_u32, P(c_u64)]),
    "kvvm_cache_layer_view": (status, [CacheHandle, c_u32, c_u32, P(View)]),
    "kvvm_cache_slot_ranges": (status, [CacheHandle, c_u32, c_u64, P(Range), c_size, P(c_size)]),
    "kvvm_cache_row": (status, [CacheHandle, c_u32, c_u64, c_u32, c_u32, P(Range)]),
    "kvvm_cache_read_row": (
        status,
        [CacheHandle, c_u32, c_u64, c_u32, c_u32, ctypes.c_void_p, c_size],
    ),
    "kvvm_cache_write_row": (
        status,
        [CacheHandle, c_u32, c_u64, c_u32, c_u32, ctypes.c_void_p, c_size],
    ),
    "kvvm_cache_stats": (status, [CacheHandle, P(Stats)]),
    "kvvm_cache_quiesce": (status, [CacheHandle]),
    "kvvm_cache_export_dlpack": (
        status,
        [CacheHandle, c_u32, c_u32, c_u32, c_u64, P(P(DLManagedTensorVersioned))],
    ),
    "kvvm_cache_export_dlpack_legacy": (
        status,
        [CacheHandle, c_u32, c_u32, c_u32, c_u64, P(P(DLManagedTensor))],
    ),
    "kvvm_dlpack_free": (None, [ctypes.c_void_p]),
    "kvvm_dlpack_free_legacy": (None, [ctypes.c_void_p]),
    "kvvm_swap_config_init": (status, [P(SwapConfig)]),
    "kvvm_swap_create": (status, [CacheHandle, P(SwapConfig), P(SwapHandle)]),
    "kvvm_swap_free": (status, [SwapHandle]),
    "kvvm_swap_set_keep_pages": (status, [SwapHandle, ctypes.c_int32]),
    "kvvm_swap_out": (status, [SwapHandle, c_u32, P(TicketHandle)]),
    "kvvm_swap_in": (status, [SwapHandle, c_u64, c_u32, P(TicketHandle)]),
    "kvvm_swap_release": (status, [SwapHandle, c_u64]),
    "kvvm_swap_pin": (status, [SwapHandle, c_u64, c_u32]),
    "kvvm_swap_set_priority": (status, [SwapHandle, c_u64, c_u32]),
    "kvvm_swap_host_tokens": (status, [SwapHandle, c_u64, P(c_u64)]),
    "kvvm_swap_get_stats": (status, [SwapHandle, P(SwapStats)]),
    "kvvm_swap_quiesce": (status, [SwapHandle]),
    "kvvm_ticket_poll": (status, [TicketHandle, P(c_u32)]),
    "kvvm_ticket_wait": (status, [TicketHandle]),
    "kvvm_ticket_event": (status, [TicketHandle, P(c_u64)]),
    "kvvm_ticket_copy": (status, [TicketHandle, P(c_u64)]),
    "kvvm_ticket_bytes": (status, [TicketHandle, P(c_u64)]),
    "kvvm_ticket_free": (status, [TicketHandle]),
}


# Ordering with the caller's CUDA streams (docs/ordering.md): streams and events are plain
# integers. Kept apart from the table above.
_SIGNATURES.update({
    "kvvm_cache_set_stream": (status, [CacheHandle, c_u64]),
    "kvvm_swap_out_after": (status, [SwapHandle, c_u32, c_u64, P(TicketHandle)]),
    "kvvm_ticket_stream_wait": (status, [TicketHandle, c_u64]),
})


_lock = threading.Lock()
_loaded: "ctypes.CDLL | None" = None
_loaded_path: "Path | None" = None


def _bundled() -> list[Path]:
    """The library a wheel or ``pip install`` put inside the package (``kvvm/libkvvm*.so``)."""
    return sorted(Path(__file__).resolve().parent.glob("libkvvm*.so"))


def _repository_builds() -> list[Path]:
    """``target/{release,debug}/libkvvm.so`` of the source checkout this file lives in."""
    root = Path(__file__).resolve().parents[2]
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    found = [p for p in (target / "release" / "libkvvm.so", target / "debug" / "libkvvm.so")
             if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def find_library() -> Path:
    """The shared library to load: the one bundled in the package, else ``$KVVM_LIBRARY``, else
    the newest of the source checkout's ``target/{release,debug}/libkvvm.so``."""
    bundled = _bundled()
    if bundled:
        return bundled[0]
    env = os.environ.get("KVVM_LIBRARY")
    if env:
        if not Path(env).is_file():
            raise OSError(f"KVVM_LIBRARY={env} is not a file")
        return Path(env)
    built = _repository_builds()
    if built:
        return built[0]
    raise OSError(
        "libkvvm.so not found: the package has no bundled library (install it with "
        "`pip install ./python` from a kvvm checkout), KVVM_LIBRARY is not set, and there is no "
        "target/{release,debug}/libkvvm.so next to this source tree (`cargo build`)"
    )


def load(path: Path | None = None) -> ctypes.CDLL:
    """Opens a library and declares the C ABI's signatures on it."""
    lib = ctypes.CDLL(str(path or find_library()))
    for name, (restype, argtypes) in _SIGNATURES.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes
    return lib


def get() -> ctypes.CDLL:
    """The process's library, loaded on first use (thread-safe)."""
    global _loaded, _loaded_path
    lib = _loaded
    if lib is not None:
        return lib
    with _lock:
        if _loaded is None:
            path = find_library()
            _loaded = load(path)
            _loaded_path = path
        return _loaded


def loaded_path() -> "Path | None":
    """The path of the loaded library, None before the first use."""
    return _loaded_path
