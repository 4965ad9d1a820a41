//! The swap engine's C ABI: engines, swap-out/in tickets, host copies.

use std::sync::Arc;

use static_assertions::{assert_eq_align, assert_eq_size};

use kvvm::{HostCopyId, SwapConfig, SwapEngine};

use crate::registry::{self, Object};
use crate::{cache_of, guard, kvvm_cache, kvvm_status, kvvm_ticket, out, FfiError};

/// Handle of a swap engine. `{0}` is the null handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct kvvm_swap {
    /// Registry id (opaque).
    pub id: u64,
}

assert_eq_size!(kvvm_swap, u64);

/// Options of a swap engine. Fill with `kvvm_swap_config_init`, then change fields.
/// `struct_size` follows the rules of `kvvm_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_swap_config {
    /// `sizeof(kvvm_swap_config)`.
    pub struct_size: u32,
    /// Transfers in flight at once (a swap beyond it waits for the oldest). Default 16.
    pub max_in_flight: u32,
    /// Bytes of host memory for host copies. Default 8 GiB.
    pub host_budget_bytes: u64,
    /// Transfers are split into chunks of at most this many bytes, to pipeline. Default 4 MiB.
    pub chunk_bytes: u64,
}
/// Size of the first published `kvvm_swap_config`.
pub const KVVM_SWAP_CONFIG_SIZE_V1: u32 = 24;
assert_eq_size!(kvvm_swap_config, [u8; 24]);
assert_eq_align!(kvvm_swap_config, u64);

/// Counters of a swap engine. The caller sets `struct_size` to `sizeof(kvvm_swap_stats)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_swap_stats {
    /// `sizeof(kvvm_swap_stats)`, set by the caller.
    pub struct_size: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Bytes copied device to host by completed swap-outs.
    pub bytes_out: u64,
    /// Bytes copied host to device by completed swap-ins.
    pub bytes_in: u64,
    /// Bytes swap-outs did not copy because the host copy already held them.
    pub reuse_saved_bytes: u64,
    /// Completed transfers.
    pub transfers: u64,
    /// Host bytes held by host copies.
    pub host_bytes_used: u64,
    /// The host budget.
    pub host_budget_bytes: u64,
    /// Host copies evicted to make room.
    pub evictions: u64,
    /// Host copies alive.
    pub copies_live: u64,
    /// Transfers in flight.
    pub in_flight: u64,
}
/// Size of the first published `kvvm_swap_stats`.
pub const KVVM_SWAP_STATS_SIZE_V1: u32 = 80;
assert_eq_size!(kvvm_swap_stats, [u8; 80]);
assert_eq_align!(kvvm_swap_stats, u64);

fn default_swap_config() -> kvvm_swap_config {
    let d = SwapConfig::default();
    kvvm_swap_config {
        struct_size: KVVM_SWAP_CONFIG_SIZE_V1,
        max_in_flight: d.max_in_flight as u32,
        host_budget_bytes: d.host_budget_bytes,
        chunk_bytes: d.chunk_bytes as u64,
    }
}

fn swap_of(h: kvvm_swap) -> Result<Arc<SwapEngine>, FfiError> {
    registry::get_swap(h.id)
}

/// Fills `*config` with the defaults; `struct_size` is set.
///
/// Thread-safe.
///
/// # Safety
/// `config` is null or points to a writable `kvvm_swap_config`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_config_init(config: *mut kvvm_swap_config) -> kvvm_status {
    guard(|| {
        // SAFETY: per this function's contract.
        *unsafe { out(config, "config") }? = default_swap_config();
        Ok(())
    })
}

/// Creates a swap engine for a cache and writes its handle to `*out_swap`. `config` may be null
/// for the defaults. The engine keeps the cache alive.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER` (`out_swap`), `KVVM_STATUS_INVALID_CONFIG`.
///
/// # Safety
/// `config` is null or valid for reads of `config->struct_size` bytes; `out_swap` is null or
/// points to a writable `kvvm_swap`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_create(
    cache: kvvm_cache,
    config: *const kvvm_swap_config,
    out_swap: *mut kvvm_swap,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        let cfg = if config.is_null() {
            default_swap_config()
        } else {
            // SAFETY: `config` is valid for its first field.
            let size = unsafe { std::ptr::read_unaligned(config.cast::<u32>()) } as usize;
            let known = std::mem::size_of::<kvvm_swap_config>();
            // SAFETY: `config` is valid for `size` bytes per the contract.
            let bytes = unsafe {
                crate::config::versioned_bytes(
                    config.cast(),
                    size,
                    KVVM_SWAP_CONFIG_SIZE_V1 as usize,
                    known,
                )
            }?;
            let mut v = kvvm_swap_config::default();
            // SAFETY: `bytes` holds `known` bytes; the struct is plain integers.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut v).cast::<u8>(), known)
            };
            v
        };
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_swap, "out_swap") }?;
        let chunk = usize::try_from(cfg.chunk_bytes).map_err(|_| {
            FfiError::new(
                kvvm_status::KVVM_STATUS_INVALID_CONFIG,
                "chunk_bytes too large",
            )
        })?;
        let engine = SwapEngine::new(
            c,
            SwapConfig {
                host_budget_bytes: cfg.host_budget_bytes,
                chunk_bytes: chunk,
                max_in_flight: cfg.max_in_flight as usize,
                keep_pages: false,
            },
        )?;
        o.id = registry::insert(Object::Swap(Arc::new(engine)));
        Ok(())
    })
}

/// Chooses what a swap-out of this engine does with the slot's pages once its copy completed,
/// from the next `kvvm_swap_out` on. `keep` 0 (the default): they are unmapped while the copy runs
/// and return to the pool, for others to use at once (preemption). Nonzero: they stay mapped to
/// the freed slot, as `kvvm_cache_free_slot` leaves them, so that a later swap-in into that slot
/// (`kvvm_cache_alloc_slot_for` prefers it) is a copy alone; reclamation takes them back when the
/// pool runs short (offloading while device memory is plentiful).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_swap_set_keep_pages(swap: kvvm_swap, keep: i32) -> kvvm_status {
    guard(|| {
        swap_of(swap)?.set_keep_pages(keep != 0);
        Ok(())
    })
}

/// Frees a swap engine handle. Transfers in flight are finished first (this call may block
/// until they are); host copies are freed. Tickets of the engine stay valid handles (their
/// transfers are finished).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_swap_free(swap: kvvm_swap) -> kvvm_status {
    guard(|| registry::remove_swap(swap.id))
}

/// Deprecated name of `kvvm_swap_free` (kept for one release).
#[no_mangle]
#[deprecated(note = "use kvvm_swap_free")]
pub extern "C" fn kvvm_swap_destroy(swap: kvvm_swap) -> kvvm_status {
    kvvm_swap_free(swap)
}

pub(crate) fn register_ticket(t: kvvm::SwapTicket, o: &mut kvvm_ticket) {
    o.id = registry::insert(Object::Ticket(Arc::new(t)));
}

/// Starts copying an allocated slot's KV to host memory and writes the transfer's ticket to
/// `*out_ticket` (free it with `kvvm_ticket_free`). Once the ticket completes the slot's pages are
/// unmapped and the slot is free; until then it must not be used. The ticket names the host copy
/// (`kvvm_ticket_copy`) to swap back in later.
///
/// Thread-safe; may block while the in-flight limit is reached.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT` (slot not allocated),
/// `KVVM_STATUS_HOST_BUDGET_EXHAUSTED`, backend errors; the slot is then as it was.
///
/// # Safety
/// `out_ticket` is null or points to a writable `kvvm_ticket`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_out(
    swap: kvvm_swap,
    slot: u32,
    out_ticket: *mut kvvm_ticket,
) -> kvvm_status {
    guard(|| {
        let s = swap_of(swap)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_ticket, "out_ticket") }?;
        register_ticket(s.swap_out(kvvm::SlotId::new(slot))?, o);
        Ok(())
    })
}

/// `kvvm_swap_out`, with the copies ordered after the caller's CUDA event `event` (a `CUevent`
/// as a plain integer, e.g. torch's `event.cuda_event`, recorded after the kernels that write the
/// slot) instead of after the cache's stream: they start once the event, as recorded at this
/// call, has completed. The host backend ignores the event.
///
/// Thread-safe; may block while the in-flight limit is reached.
///
/// # Errors
/// As `kvvm_swap_out`; a backend error for an invalid event.
///
/// # Safety
/// `out_ticket` is null or points to a writable `kvvm_ticket`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_out_after(
    swap: kvvm_swap,
    slot: u32,
    event: u64,
    out_ticket: *mut kvvm_ticket,
) -> kvvm_status {
    guard(|| {
        let s = swap_of(swap)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_ticket, "out_ticket") }?;
        register_ticket(s.swap_out_after(kvvm::SlotId::new(slot), event)?, o);
        Ok(())
    })
}

/// Starts copying host copy `copy` back into `slot`, which must be allocated and empty (e.g.
/// from `kvvm_cache_alloc_slot_for`). Writes the ticket to `*out_ticket`; the slot must not be
/// used until it completes. The host copy stays valid afterwards (a later swap-out of the slot
/// copies only new tokens).
///
/// Thread-safe; may block while the copy is in another transfer or the in-flight limit is
/// reached.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT` (unknown copy, slot not
/// allocated or not empty), `KVVM_STATUS_BUDGET_EXHAUSTED`, backend errors; nothing changed then.
///
/// # Safety
/// `out_ticket` is null or points to a writable `kvvm_ticket`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_in(
    swap: kvvm_swap,
    copy: u64,
    slot: u32,
    out_ticket: *mut kvvm_ticket,
) -> kvvm_status {
    guard(|| {
        let s = swap_of(swap)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_ticket, "out_ticket") }?;
        register_ticket(
            s.swap_in(HostCopyId::from_raw(copy), kvvm::SlotId::new(slot))?,
            o,
        );
        Ok(())
    })
}

/// Drops a host copy (after a transfer using it, if one is in flight).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`; `KVVM_STATUS_INVALID_ARGUMENT` for an unknown, released or evicted copy.
#[no_mangle]
pub extern "C" fn kvvm_swap_release(swap: kvvm_swap, copy: u64) -> kvvm_status {
    guard(|| Ok(swap_of(swap)?.release(HostCopyId::from_raw(copy))?))
}

/// Pins (`pinned != 0`) or unpins a host copy; pinned copies are never evicted.
///
/// Thread-safe.
///
/// # Errors
/// As `kvvm_swap_release`.
#[no_mangle]
pub extern "C" fn kvvm_swap_pin(swap: kvvm_swap, copy: u64, pinned: u32) -> kvvm_status {
    guard(|| Ok(swap_of(swap)?.pin(HostCopyId::from_raw(copy), pinned != 0)?))
}

/// Sets a host copy's eviction priority (0..=255; lower is evicted first).
///
/// Thread-safe.
///
/// # Errors
/// As `kvvm_swap_release`; `KVVM_STATUS_INVALID_ARGUMENT` for a priority above 255.
#[no_mangle]
pub extern "C" fn kvvm_swap_set_priority(swap: kvvm_swap, copy: u64, priority: u32) -> kvvm_status {
    guard(|| {
        let s = swap_of(swap)?;
        let p = u8::try_from(priority)
            .map_err(|_| FfiError::arg(format!("priority {priority} above 255")))?;
        Ok(s.set_priority(HostCopyId::from_raw(copy), p)?)
    })
}

/// Writes the tokens a host copy holds to `*tokens`.
///
/// Thread-safe.
///
/// # Errors
/// As `kvvm_swap_release`; `KVVM_STATUS_NULL_POINTER`.
///
/// # Safety
/// `tokens` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_host_tokens(
    swap: kvvm_swap,
    copy: u64,
    tokens: *mut u64,
) -> kvvm_status {
    guard(|| {
        let s = swap_of(swap)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(tokens, "tokens") }?;
        *o = s.host_tokens(HostCopyId::from_raw(copy))? as u64;
        Ok(())
    })
}

/// Writes the engine's counters to `*stats`; the caller sets `stats->struct_size`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT` for a `struct_size`
/// below `KVVM_SWAP_STATS_SIZE_V1`.
///
/// # Safety
/// `stats` is null or valid for writes of `stats->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_swap_get_stats(
    swap: kvvm_swap,
    stats: *mut kvvm_swap_stats,
) -> kvvm_status {
    guard(|| {
        let s = swap_of(swap)?;
        if stats.is_null() {
            return Err(FfiError::null("stats"));
        }
        // SAFETY: `stats` is valid for at least its first field.
        let size = unsafe { std::ptr::read_unaligned(stats.cast::<u32>()) };
        if size < KVVM_SWAP_STATS_SIZE_V1 {
            return Err(FfiError::arg(format!(
                "stats->struct_size {size} is below {KVVM_SWAP_STATS_SIZE_V1}"
            )));
        }
        let st = s.stats();
        let v = kvvm_swap_stats {
            struct_size: size,
            reserved: 0,
            bytes_out: st.bytes_out,
            bytes_in: st.bytes_in,
            reuse_saved_bytes: st.reuse_saved_bytes,
            transfers: st.transfers,
            host_bytes_used: st.host_bytes_used,
            host_budget_bytes: st.host_budget_bytes,
            evictions: st.evictions,
            copies_live: st.copies_live,
            in_flight: st.in_flight,
        };
        let n = (size as usize).min(std::mem::size_of::<kvvm_swap_stats>());
        // SAFETY: `stats` is valid for `size >= n` bytes; `v` is plain integers.
        unsafe {
            std::ptr::copy_nonoverlapping((&raw const v).cast::<u8>(), stats.cast::<u8>(), n)
        };
        Ok(())
    })
}

/// Waits until no transfer of the engine is in flight.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_swap_quiesce(swap: kvvm_swap) -> kvvm_status {
    guard(|| {
        swap_of(swap)?.quiesce();
        Ok(())
    })
}
