//! [`AddressSpace`]: what a tensor handed to other code holds instead of the cache.

use std::sync::{Arc, Mutex};

use super::MeteredBackend;
use crate::vmm::{Backend, Detached, VaRange};

/// What every [`AddressSpace`] of one cache shares: empty while the cache lives; at the cache's
/// drop, while address spaces are still held, the ranges and pages handed over to them.
#[derive(Debug, Default)]
pub(super) struct SpaceCell {
    pub(super) detached: Mutex<Option<Box<dyn Detached>>>,
}

/// Keeps a cache's virtual KV tensors valid after the cache is gone.
///
/// A clone of it is what an exported tensor (the C ABI's DLPack export, a view handed to code
/// that may outlive the cache) holds instead of the cache. While the cache lives it does
/// nothing. When the cache is dropped while address spaces are still held, the cache's threads
/// stop, its free pages go back to the system and its files close, as usual, but its reserved
/// ranges and the pages mapped in them at that moment stay mapped, with their contents, until
/// the last address space is dropped; then they are unmapped and freed (on CUDA after
/// `cuCtxSynchronize`, so that no queued kernel still reads them). A tensor thus reads and
/// writes the tokens it described when it was made for as long as it lives; ranges unmapped at
/// the drop read as zeros (the zero page) or fault, as they did before.
///
/// # Examples
/// ```
/// use kvvm::{CacheConfig, DType, Kv, KvCache};
/// use kvvm::vmm::{BackendChoice, BackendConfig};
///
/// let cache = KvCache::new(
///     CacheConfig::new(1, 1, 16)
///         .with_dtype(DType::F32)
///         .with_max_slots(2)
///         .with_max_tokens(64)
///         .with_budget_bytes(1 << 20)
///         .with_backend(BackendConfig { choice: BackendChoice::Host, host_granularity: 4096, ..Default::default() }),
/// )?;
/// let slot = cache.alloc_slot_for(8)?;
/// cache.ensure(slot, 8)?;
/// let addr = cache.layer_view(0, Kv::K)?.row_addr(slot.as_usize(), 0, 0);
/// // SAFETY (doctest): token 0 of the slot is mapped.
/// unsafe { (addr as usize as *mut f32).write(1.5) };
///
/// let space = cache.address_space();
/// assert!(!space.holds_ranges());
/// drop(cache); // threads stopped, files closed; the mapped pages stay for `space`
/// assert!(space.holds_ranges());
/// // SAFETY (doctest): `space` keeps the page mapped.
/// assert_eq!(unsafe { (addr as usize as *const f32).read() }, 1.5);
/// drop(space); // unmapped and freed now
/// # Ok::<(), kvvm::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct AddressSpace(pub(super) Arc<SpaceCell>);

impl AddressSpace {
    /// True once the cache was dropped and the address spaces keep its ranges.
    pub fn holds_ranges(&self) -> bool {
        self.0
            .detached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// The ranges kept for address spaces when the backend cannot detach them (a wrapper that does
/// not forward [`Backend::detach`]): the pages were unmapped and released as at any drop, and
/// the ranges stay reserved, through the backend, until the last address space goes.
#[derive(Debug)]
pub(super) struct KeptRanges {
    pub(super) backend: Arc<MeteredBackend>,
    pub(super) ranges: Vec<VaRange>,
}

impl Detached for KeptRanges {}

impl Drop for KeptRanges {
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.ranges) {
            if let Err(e) = self.backend.free_reservation(r) {
                tracing::warn!("freeing a reservation kept for an export failed: {e}");
            }
        }
    }
}
