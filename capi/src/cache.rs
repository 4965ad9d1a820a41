//! `kvvm_cache`: a KV cache of contiguous virtual tensors; slots, growth, views, rows, stats.

use std::ffi::c_void;
use std::sync::Arc;

use static_assertions::{assert_eq_align, assert_eq_size};

use kvvm::vmm::BackendKind;
use kvvm::{Kv, KvCache, SlotId};

use crate::registry::{self, Object};
use crate::*;

/// Handle of a cache. `{0}` is the null handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct kvvm_cache {
    /// Registry id (opaque).
    pub id: u64,
}

assert_eq_size!(kvvm_cache, u64);

/// A strided view of one layer's K or V: what a kernel needs to address it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvvm_view {
    /// Address of element 0 (host or device address).
    pub data: *mut c_void,
    /// Number of dimensions used in `shape`/`strides` (4: slots, tokens, kv_heads, head_dim).
    pub ndim: i32,
    /// Element type (`kvvm_dtype`).
    pub dtype: u32,
    /// Sizes; entries past `ndim` are 0.
    pub shape: [i64; 6],
    /// Strides in elements; entries past `ndim` are 0.
    pub strides: [i64; 6],
    /// `kvvm_device_type` (DLPack device type).
    pub device_type: i32,
    /// Device ordinal (0 on host).
    pub device_id: i32,
    /// Bytes per element.
    pub itemsize: u32,
    /// Reserved, 0.
    pub reserved: u32,
}
assert_eq_size!(kvvm_view, [u8; 128]);
assert_eq_align!(kvvm_view, u64);

/// One entry of a `kvvm_cache_step` batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_slot_tokens {
    /// The slot.
    pub slot: u32,
    /// Reserved, ignored.
    pub reserved: u32,
    /// Tokens the slot must hold.
    pub tokens: u64,
}
assert_eq_size!(kvvm_slot_tokens, [u8; 16]);
assert_eq_align!(kvvm_slot_tokens, u64);

/// A contiguous byte range in the cache's address space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_range {
    /// First byte (host or device address).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}
assert_eq_size!(kvvm_range, [u8; 16]);
assert_eq_align!(kvvm_range, u64);

/// Statistics of a cache. Set `struct_size` to `sizeof(kvvm_stats)` before the call; the library
/// writes at most that many bytes (and at least `KVVM_STATS_SIZE_V1` must be given).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_stats {
    /// `sizeof(kvvm_stats)`, set by the caller.
    pub struct_size: u32,
    /// Allocated slots.
    pub allocated_slots: u32,
    /// Bytes of pages mapped into the cache.
    pub mapped_bytes: u64,
    /// Bytes holding live tokens of allocated slots.
    pub live_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages the budget allows.
    pub budget_pages: u64,
    /// Pages that exist (mapped or free).
    pub pool_live_pages: u64,
    /// Pages on the pool's free list.
    pub pool_free_pages: u64,
    /// Pages handed out by the pool.
    pub pool_in_use_pages: u64,
    /// Pages created over the cache's life.
    pub pages_created: u64,
    /// Pages released over the cache's life.
    pub pages_released: u64,
    /// Backend calls of every kind.
    pub backend_calls: u64,
    /// Backend calls made on the caller's threads.
    pub foreground_calls: u64,
    /// Times the background mapper mapped ahead.
    pub mapper_batches: u64,
    /// Pages the background mapper mapped.
    pub mapper_pages: u64,
    /// Pages taken back from free slots under pressure.
    pub reclaimed_pages: u64,
}
/// Size of the first published `kvvm_stats`.
pub const KVVM_STATS_SIZE_V1: u32 = 120;
assert_eq_size!(kvvm_stats, [u8; 120]);
assert_eq_align!(kvvm_stats, u64);

pub(crate) fn cache_of(h: kvvm_cache) -> FfiResult<Arc<KvCache>> {
    registry::get_cache(h.id)
}

/// Creates a cache and writes its handle to `*out`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_NULL_POINTER`; `KVVM_STATUS_INVALID_CONFIG` for a bad configuration or `struct_size` (see
/// `kvvm_config`); backend and driver errors. `*out` is written only on success.
///
/// # Safety
/// `config` is null or valid for reads of `config->struct_size` bytes; `out` is null or points
/// to a writable `kvvm_cache`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_create(
    config: *const kvvm_config,
    out_cache: *mut kvvm_cache,
) -> kvvm_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let c = unsafe { read_config(config) }?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_cache, "out_cache") }?;
        let cache = KvCache::new(config_from_c(&c)?)?;
        o.id = registry::insert(Object::Cache(Arc::new(cache)));
        Ok(())
    })
}

/// Frees a cache handle. The cache itself lives on while swap engines or exported DLPack
/// tensors still use it, and is freed with the last of them. The handle becomes invalid.
///
/// Thread-safe; calls still running on the cache from other threads finish normally.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE` for a null, freed or unknown handle.
#[no_mangle]
pub extern "C" fn kvvm_cache_free(cache: kvvm_cache) -> kvvm_status {
    guard(|| registry::remove_cache(cache.id))
}

/// Deprecated name of `kvvm_cache_free` (kept for one release).
#[no_mangle]
#[deprecated(note = "use kvvm_cache_free")]
pub extern "C" fn kvvm_cache_destroy(cache: kvvm_cache) -> kvvm_status {
    kvvm_cache_free(cache)
}

/// Allocates a free slot (preferring one whose pages are still mapped) and writes it to `*slot`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_SLOTS_EXHAUSTED`.
///
/// # Safety
/// `slot` is null or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_alloc_slot(cache: kvvm_cache, slot: *mut u32) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(slot, "slot") }?;
        *o = c.alloc_slot()?.index();
        Ok(())
    })
}

/// Allocates a free slot for a request expected to need `tokens` tokens (the free slot whose
/// mapped pages best fit) and writes it to `*slot`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_SLOTS_EXHAUSTED`.
///
/// # Safety
/// `slot` is null or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_alloc_slot_for(
    cache: kvvm_cache,
    tokens: u64,
    slot: *mut u32,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(slot, "slot") }?;
        *o = c.alloc_slot_for(to_usize(tokens, "tokens")?)?.index();
        Ok(())
    })
}

/// Frees an allocated slot. Its pages stay mapped for a later request until reclaimed.
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`; `KVVM_STATUS_INVALID_ARGUMENT` for a slot out of range or not allocated.
#[no_mangle]
pub extern "C" fn kvvm_cache_free_slot(cache: kvvm_cache, slot: u32) -> kvvm_status {
    guard(|| Ok(cache_of(cache)?.free_slot(SlotId::new(slot))?))
}

/// Makes `slot` hold `tokens` tokens, mapping missing pages; all or nothing: on failure the slot
/// is as it was.
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`; `KVVM_STATUS_INVALID_ARGUMENT` (bad slot, `tokens > max_tokens`);
/// `KVVM_STATUS_BUDGET_EXHAUSTED`, `KVVM_STATUS_MAP_COUNT_EXHAUSTED`, backend errors.
#[no_mangle]
pub extern "C" fn kvvm_cache_ensure(cache: kvvm_cache, slot: u32, tokens: u64) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        Ok(c.ensure(SlotId::new(slot), to_usize(tokens, "tokens")?)?)
    })
}

/// `kvvm_cache_ensure` for a batch of `n` (slot, tokens) pairs, then hints the background mapper.
/// All or nothing over the whole batch.
///
/// Thread-safe.
///
/// # Errors
/// As `kvvm_cache_ensure`; `KVVM_STATUS_NULL_POINTER` if `batch` is null and `n > 0`.
///
/// # Safety
/// `batch` is null or valid for reads of `n` entries.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_step(
    cache: kvvm_cache,
    batch: *const kvvm_slot_tokens,
    n: usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        let entries: &[kvvm_slot_tokens] = if n == 0 {
            &[]
        } else if batch.is_null() {
            return Err(FfiError::null("batch"));
        } else {
            // SAFETY: non-null and valid for `n` entries per the contract.
            unsafe { std::slice::from_raw_parts(batch, n) }
        };
        // `n` comes from the caller: an allocation that fails is an error, not an abort.
        let mut v = Vec::new();
        v.try_reserve_exact(entries.len()).map_err(|_| {
            FfiError::arg(format!("a batch of {n} entries is too large to process"))
        })?;
        for e in entries {
            v.push((SlotId::new(e.slot), to_usize(e.tokens, "tokens")?));
        }
        Ok(c.step(&v)?)
    })
}

/// Cuts `slot` to `min(tokens, current)` live tokens and unmaps its pages beyond `tokens`.
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`; `KVVM_STATUS_INVALID_ARGUMENT` for a bad slot; a backend error if unmapping
/// fails (the slot then holds `min(tokens, current)` tokens, nothing leaks).
#[no_mangle]
pub extern "C" fn kvvm_cache_shrink(cache: kvvm_cache, slot: u32, tokens: u64) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        Ok(c.shrink(SlotId::new(slot), to_usize(tokens, "tokens")?)?)
    })
}

/// Sets the caller's compute stream: a `CUstream` as a plain integer (torch:
/// `stream.cuda_stream`; 0 is the legacy default stream). Swap-out copies and every unmap are
/// ordered after the work queued on it before the call that needs them (see docs/ordering.md);
/// without it kvvm orders after the legacy default stream. The host backend ignores it.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_cache_set_stream(cache: kvvm_cache, stream: u64) -> kvvm_status {
    guard(|| {
        cache_of(cache)?.set_compute_stream(Some(stream));
        Ok(())
    })
}

/// Writes the live tokens of an allocated slot to `*tokens`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `tokens` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_tokens(
    cache: kvvm_cache,
    slot: u32,
    tokens: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(tokens, "tokens") }?;
        *o = c.tokens(SlotId::new(slot))? as u64;
        Ok(())
    })
}

/// Writes the tokens the slot's mapped pages can hold now to `*capacity`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `capacity` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_capacity(
    cache: kvvm_cache,
    slot: u32,
    capacity: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(capacity, "capacity") }?;
        *o = c.capacity(SlotId::new(slot))? as u64;
        Ok(())
    })
}

/// Writes the 4-D view `[max_slots, max_tokens, kv_heads, head_dim]` of layer `layer`'s K or V
/// (`kv`: `kvvm_kv`) to `*view`. Only the tokens a slot has mapped may be accessed.
///
/// Thread-safe. The view does not keep the cache alive.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `view` is null or points to a writable `kvvm_view`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_layer_view(
    cache: kvvm_cache,
    layer: u32,
    kv: u32,
    view: *mut kvvm_view,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(view, "view") }?;
        let v = c.layer_view(layer as usize, kv_from(kv)?)?;
        let mut shape = [0i64; 6];
        let mut strides = [0i64; 6];
        for i in 0..4 {
            shape[i] = v.shape[i] as i64;
            strides[i] = v.strides[i] as i64;
        }
        let (device_type, device_id) = device_code(v.device.kind, v.device.ordinal);
        *o = kvvm_view {
            data: v.addr as usize as *mut c_void,
            ndim: 4,
            dtype: dtype_code(v.dtype),
            shape,
            strides,
            device_type,
            device_id,
            itemsize: v.dtype.size() as u32,
            reserved: 0,
        };
        Ok(())
    })
}

/// Writes the byte ranges holding the first `tokens` tokens of `slot` (one per buffer: 1 for the
/// interleaved layout, `2 × layers` per-layer) to `ranges[0..]`, and their count to `*count`.
/// If `capacity` is too small (or `ranges` is null), only `*count` is written and
/// `KVVM_STATUS_BUFFER_TOO_SMALL` is returned.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER` (`count`), `KVVM_STATUS_INVALID_ARGUMENT`,
/// `KVVM_STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `ranges` is null or valid for writes of `capacity` entries; `count` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_slot_ranges(
    cache: kvvm_cache,
    slot: u32,
    tokens: u64,
    ranges: *mut kvvm_range,
    capacity: usize,
    count: *mut usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let n = unsafe { out(count, "count") }?;
        let r = c.slot_ranges(SlotId::new(slot), to_usize(tokens, "tokens")?)?;
        *n = r.len();
        if ranges.is_null() || capacity < r.len() {
            return Err(FfiError::new(
                kvvm_status::KVVM_STATUS_BUFFER_TOO_SMALL,
                format!("{} ranges needed, room for {capacity}", r.len()),
            ));
        }
        // SAFETY: `ranges` is valid for `capacity >= r.len()` entries per the contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(ranges, r.len()) };
        for (d, s) in dst.iter_mut().zip(&r) {
            *d = kvvm_range {
                addr: s.addr,
                len: s.len as u64,
            };
        }
        Ok(())
    })
}

/// Writes the address and length of the `[kv_heads, head_dim]` row of `token` in layer `layer`'s
/// K or V of `slot` to `*row`, checking that the slot is allocated and `token` is one of its live
/// tokens (below `kvvm_cache_tokens`; pages beyond them may be reclaimed at any time).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT` (anything out of range,
/// a free slot, a token that is not live).
///
/// # Safety
/// `row` is null or points to a writable `kvvm_range`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_row(
    cache: kvvm_cache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    row: *mut kvvm_range,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(row, "row") }?;
        let r = c.row(
            SlotId::new(slot),
            to_usize(token, "token")?,
            layer as usize,
            kv_from(kv)?,
        )?;
        *o = kvvm_range {
            addr: r.addr,
            len: r.len as u64,
        };
        Ok(())
    })
}

/// Checks the row exists and the backend is the host one; returns (address, length).
fn host_row(
    c: &KvCache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    len: usize,
) -> FfiResult<(u64, usize)> {
    let r = c.row(
        SlotId::new(slot),
        to_usize(token, "token")?,
        layer as usize,
        kv_from(kv)?,
    )?;
    if c.layer_view(0, Kv::K)?.device.kind != BackendKind::Host {
        return Err(FfiError::new(
            kvvm_status::KVVM_STATUS_UNSUPPORTED,
            "row copies are supported on the host backend only (use the view on a device)",
        ));
    }
    if len != r.len {
        return Err(FfiError::arg(format!(
            "buffer of {len} bytes given, a row is {} bytes",
            r.len
        )));
    }
    Ok((r.addr, r.len))
}

/// Copies the bytes of one `[kv_heads, head_dim]` row (see `kvvm_cache_row`) into `buf`;
/// `len` must equal the row's size. Host backend only. Meant for tests and debugging.
///
/// Thread-safe with respect to the cache; the caller must not write the row, nor change the
/// slot's mapping (shrink, free, swap out), concurrently.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT`, `KVVM_STATUS_UNSUPPORTED` on
/// a device backend.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_read_row(
    cache: kvvm_cache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    buf: *mut u8,
    len: usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if buf.is_null() {
            return Err(FfiError::null("buf"));
        }
        let (addr, n) = host_row(&c, slot, token, layer, kv, len)?;
        // SAFETY: `addr..addr+n` is mapped host memory of the cache (checked by `row`, and the
        // `Arc` keeps the cache alive); `buf` is valid for `n == len` bytes per the contract.
        unsafe { std::ptr::copy(addr as usize as *const u8, buf, n) };
        Ok(())
    })
}

/// Copies `len` bytes from `buf` into one `[kv_heads, head_dim]` row (see `kvvm_cache_row`);
/// `len` must equal the row's size. Host backend only. Meant for tests and debugging.
///
/// Thread-safe with respect to the cache; the caller must not access the row, nor change the
/// slot's mapping (shrink, free, swap out), concurrently.
///
/// # Errors
/// As `kvvm_cache_read_row`.
///
/// # Safety
/// `buf` is null or valid for reads of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_write_row(
    cache: kvvm_cache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    buf: *const u8,
    len: usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if buf.is_null() {
            return Err(FfiError::null("buf"));
        }
        let (addr, n) = host_row(&c, slot, token, layer, kv, len)?;
        // SAFETY: as in `kvvm_cache_read_row`, with the roles swapped.
        unsafe { std::ptr::copy(buf, addr as usize as *mut u8, n) };
        Ok(())
    })
}

/// Writes a snapshot of the cache's statistics to `*stats`. The caller sets
/// `stats->struct_size` to `sizeof(kvvm_stats)`; at most that many bytes are written.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT` for a `struct_size`
/// below `KVVM_STATS_SIZE_V1`.
///
/// # Safety
/// `stats` is null or valid for writes of `stats->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_stats(
    cache: kvvm_cache,
    stats: *mut kvvm_stats,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if stats.is_null() {
            return Err(FfiError::null("stats"));
        }
        // SAFETY: `stats` is valid for at least its first field.
        let size = unsafe { std::ptr::read_unaligned(stats.cast::<u32>()) };
        if size < KVVM_STATS_SIZE_V1 {
            return Err(FfiError::arg(format!(
                "stats->struct_size {size} is below {KVVM_STATS_SIZE_V1}"
            )));
        }
        let s = c.stats();
        let known = kvvm_stats {
            struct_size: size,
            allocated_slots: s.allocated_slots as u32,
            mapped_bytes: s.mapped_bytes,
            live_bytes: s.live_bytes,
            page_size: s.pool.page_size as u64,
            budget_pages: s.pool.budget_pages as u64,
            pool_live_pages: s.pool.live as u64,
            pool_free_pages: s.pool.free as u64,
            pool_in_use_pages: s.pool.in_use as u64,
            pages_created: s.pool.created,
            pages_released: s.pool.released,
            backend_calls: s.total_backend_calls(),
            foreground_calls: s.foreground_calls,
            mapper_batches: s.mapper_batches,
            mapper_pages: s.mapper_pages,
            reclaimed_pages: s.reclaimed_pages,
        };
        let n = (size as usize).min(std::mem::size_of::<kvvm_stats>());
        // SAFETY: `stats` is valid for `size >= n` bytes; `known` is a plain-integer struct.
        unsafe {
            std::ptr::copy_nonoverlapping((&raw const known).cast::<u8>(), stats.cast::<u8>(), n)
        };
        Ok(())
    })
}

/// Waits until the background mapper is idle (for tests and benchmarks).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_cache_quiesce(cache: kvvm_cache) -> kvvm_status {
    guard(|| {
        cache_of(cache)?.quiesce();
        Ok(())
    })
}
