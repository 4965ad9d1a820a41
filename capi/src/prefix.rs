//! Prefix sharing: publish a slot's full pages under chained content keys and admit requests
//! whose tokens start with a cached chain by mapping the cached pages (read-only) behind a new
//! slot. See `docs/prefix-sharing.md` for the contract.

use static_assertions::{assert_eq_align, assert_eq_size};

use kvvm::SlotId;

use crate::cache::cache_of;
use crate::error::{guard, out, to_usize, FfiError, FfiResult};
use crate::*;

/// Counters of the prefix index (see `kvvm_cache_prefix_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvvm_prefix_stats {
    /// Page indices the index holds (each one page per buffer).
    pub cached_pages: u64,
    /// Of those, page indices no allocated slot maps (evicted first under pressure).
    pub reclaimable_pages: u64,
    /// Lookups made by the `kvvm_cache_alloc_slot_with_prefix*` calls.
    pub lookups: u64,
    /// Lookups that reused at least one page.
    pub hits: u64,
    /// Tokens reused by hits.
    pub hit_tokens: u64,
    /// Bytes of pages mapped by hits instead of being filled again.
    pub bytes_saved: u64,
    /// Page indices published.
    pub published_pages: u64,
    /// Page indices evicted.
    pub evicted_pages: u64,
}

assert_eq_size!(kvvm_prefix_stats, [u8; 64]);
assert_eq_align!(kvvm_prefix_stats, u64);

/// A slice from a C array (`n == 0` allows null).
///
/// # Safety
/// `p` is null or valid for reads of `n` elements.
unsafe fn array<'a, T>(p: *const T, n: u64, what: &str) -> FfiResult<&'a [T]> {
    let n = to_usize(n, what)?;
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and valid for `n` elements per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Writes the tokens one page index of a slot holds (the unit of prefix sharing) to `*tokens`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`; `KVVM_STATUS_UNSUPPORTED` when a
/// page does not hold whole tokens.
///
/// # Safety
/// `tokens` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_tokens_per_page(
    cache: kvvm_cache,
    tokens: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(tokens, "tokens") }?;
        *o = c.tokens_per_page()? as u64;
        Ok(())
    })
}

/// Publishes the full pages of `slot` covered by its token ids `tokens[0..n_tokens]` (from its
/// first token) under chained keys in `ns` (the model or adapter); the pages become read-only
/// for the slot too. Writes how many leading page indices of the slot are read-only to
/// `*pages` (may be null).
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER` (`tokens` null with `n_tokens > 0`),
/// `KVVM_STATUS_INVALID_ARGUMENT` (bad slot), `KVVM_STATUS_UNSUPPORTED`, backend errors (then
/// nothing changed).
///
/// # Safety
/// `tokens` is null or valid for reads of `n_tokens` values; `pages` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_publish(
    cache: kvvm_cache,
    slot: u32,
    tokens: *const u32,
    n_tokens: u64,
    ns: u64,
    pages: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let t = unsafe { array(tokens, n_tokens, "tokens") }?;
        let n = c.publish(SlotId::new(slot), t, ns)?;
        // SAFETY: per this function's contract.
        if let Some(p) = unsafe { pages.as_mut() } {
            *p = n as u64;
        }
        Ok(())
    })
}

/// `kvvm_cache_publish` with the caller's own per-page keys: `keys[i]` names the content of the
/// slot's first `i + 1` pages (equal keys must mean equal KV).
///
/// # Errors
/// As `kvvm_cache_publish`.
///
/// # Safety
/// `keys` is null or valid for reads of `n_keys` values; `pages` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_publish_keys(
    cache: kvvm_cache,
    slot: u32,
    keys: *const u64,
    n_keys: u64,
    pages: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let k = unsafe { array(keys, n_keys, "keys") }?;
        let n = c.publish_keys(SlotId::new(slot), k)?;
        // SAFETY: per this function's contract.
        if let Some(p) = unsafe { pages.as_mut() } {
            *p = n as u64;
        }
        Ok(())
    })
}

fn write_hit(slot: *mut u32, reused: *mut u64, hit: kvvm::PrefixHit) -> FfiResult {
    // SAFETY: the callers' contracts make `slot` null or writable.
    let s = unsafe { out(slot, "slot") }?;
    *s = hit.slot.index();
    // SAFETY: the callers' contracts make `reused` null or writable.
    if let Some(r) = unsafe { reused.as_mut() } {
        *r = hit.tokens as u64;
    }
    Ok(())
}

/// Allocates a slot for a request whose token ids are `tokens[0..n_tokens]`, with the longest
/// cached chain of its full pages already mapped (read-only). Writes the slot to `*slot` and the
/// number of tokens it already holds (a multiple of `kvvm_cache_tokens_per_page`) to `*reused`
/// (may be null); the caller prefills the rest. All or nothing.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_SLOTS_EXHAUSTED`,
/// `KVVM_STATUS_UNSUPPORTED`, backend errors (then no slot is allocated).
///
/// # Safety
/// `tokens` is null or valid for reads of `n_tokens` values; `slot` is null or writable;
/// `reused` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_alloc_slot_with_prefix(
    cache: kvvm_cache,
    tokens: *const u32,
    n_tokens: u64,
    ns: u64,
    slot: *mut u32,
    reused: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if slot.is_null() {
            return Err(FfiError::null("slot"));
        }
        // SAFETY: per this function's contract.
        let t = unsafe { array(tokens, n_tokens, "tokens") }?;
        let hit = c.alloc_slot_with_prefix(t, ns)?;
        write_hit(slot, reused, hit)
    })
}

/// `kvvm_cache_alloc_slot_with_prefix` with the caller's own per-page keys; `tokens_hint` is
/// the request's expected length.
///
/// # Errors
/// As `kvvm_cache_alloc_slot_with_prefix`.
///
/// # Safety
/// `keys` is null or valid for reads of `n_keys` values; `slot` and `reused` are null or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_alloc_slot_with_prefix_keys(
    cache: kvvm_cache,
    keys: *const u64,
    n_keys: u64,
    tokens_hint: u64,
    slot: *mut u32,
    reused: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if slot.is_null() {
            return Err(FfiError::null("slot"));
        }
        // SAFETY: per this function's contract.
        let k = unsafe { array(keys, n_keys, "keys") }?;
        let hit = c.alloc_slot_with_prefix_keys(k, to_usize(tokens_hint, "tokens_hint")?)?;
        write_hit(slot, reused, hit)
    })
}

/// Evicts up to `pages` cached page indices that no slot maps, least recently used chain tails
/// first; writes how many pool pages were freed to `*freed` (may be null).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
///
/// # Safety
/// `freed` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_evict_prefixes(
    cache: kvvm_cache,
    pages: u64,
    freed: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        let n = c.evict_prefixes(usize::try_from(pages).unwrap_or(usize::MAX));
        // SAFETY: per this function's contract.
        if let Some(f) = unsafe { freed.as_mut() } {
            *f = n as u64;
        }
        Ok(())
    })
}

/// Writes the number of leading tokens of `slot` that are mapped read-only (shared or
/// published) to `*tokens`.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `tokens` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_read_only_tokens(
    cache: kvvm_cache,
    slot: u32,
    tokens: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(tokens, "tokens") }?;
        *o = c.read_only_tokens(SlotId::new(slot))? as u64;
        Ok(())
    })
}

/// Writes the prefix index's counters to `*stats`.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`.
///
/// # Safety
/// `stats` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_prefix_stats(
    cache: kvvm_cache,
    stats: *mut kvvm_prefix_stats,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(stats, "stats") }?;
        let p = c.stats().prefix;
        *o = kvvm_prefix_stats {
            cached_pages: p.cached_pages as u64,
            reclaimable_pages: p.reclaimable_pages as u64,
            lookups: p.lookups,
            hits: p.hits,
            hit_tokens: p.hit_tokens,
            bytes_saved: p.bytes_saved,
            published_pages: p.published_pages,
            evicted_pages: p.evicted_pages,
        };
        Ok(())
    })
}
