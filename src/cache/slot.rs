//! Slots: the public [`SlotId`] and the cache's per-slot state.

use crate::vmm::PageHandle;

/// A slot of a [`KvCache`](crate::KvCache): one request's contiguous region in every buffer, `0..max_slots`.
///
/// The index is the slot's position in the batch dimension of the views
/// ([`KvCache::layer_view`](crate::KvCache::layer_view)), so an engine may use it as the row of its batch tensors.
///
/// ```
/// use kvvm::SlotId;
/// let s = SlotId::new(3);
/// assert_eq!(s.index(), 3);
/// assert_eq!(u32::from(s), 3);
/// assert_eq!(s.to_string(), "3");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct SlotId(u32);

impl SlotId {
    /// The slot with index `index` (whether it exists is checked by the cache's calls).
    pub const fn new(index: u32) -> Self {
        SlotId(index)
    }

    /// The slot's index.
    pub const fn index(self) -> u32 {
        self.0
    }

    /// The slot's index as a `usize` (for indexing batch tensors).
    pub const fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl From<u32> for SlotId {
    fn from(index: u32) -> Self {
        SlotId(index)
    }
}

impl From<SlotId> for u32 {
    fn from(slot: SlotId) -> Self {
        slot.0
    }
}

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) allocated: bool,
    /// Live tokens (allocated slots only).
    pub(super) tokens: usize,
    /// Mapped pages per buffer, in address order from the slot's start.
    pub(super) pages: Vec<Vec<PageHandle>>,
    /// A thread is changing this slot's mappings outside the lock.
    pub(super) busy: bool,
    /// Of `busy`: the change takes pages away (shrink, reclamation), so pages the slot lists now
    /// may be gone when it ends; growth must wait even if it needs no new page.
    pub(super) shrinking: bool,
    /// Tokens the background mapper should make room for.
    pub(super) ahead: usize,
    /// Cached smallest page count over the buffers (kept by `refresh`).
    pub(super) min_pages: usize,
    /// Tokens promised by growth calls in flight (0 when none): reclamation keeps the pages
    /// they need even before the calls commit their new token counts.
    pub(super) pending: usize,
    /// Growth calls in flight that made a promise in `pending` (it is cleared when the last ends).
    pub(super) promises: u32,
    /// Bumped whenever the slot's tokens stop being a continuation of what they were
    /// (allocation, shrink): lets the swap engine tell whether a host copy still matches.
    pub(super) epoch: u64,
    /// The fence of the caller's work that may still read this slot's pages (recorded by
    /// `free_slot` and `shrink`; `None` when nothing can). See `docs/ordering.md`.
    pub(super) fence: Option<std::sync::Arc<dyn crate::vmm::Fence>>,
}

impl Slot {
    /// Pages mapped in every buffer.
    pub(super) fn mapped(&self) -> usize {
        self.min_pages
    }
    /// (buffer, page count) of every buffer holding more than `keep` pages: what to unmap to
    /// cut the slot to `keep` pages per buffer.
    pub(super) fn tails(&self, keep: usize) -> Vec<(usize, usize)> {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.len() > keep)
            .map(|(b, p)| (b, p.len()))
            .collect()
    }
    /// Recomputes the cached page count after the page lists changed.
    pub(super) fn refresh(&mut self) {
        self.min_pages = self.pages.iter().map(Vec::len).min().unwrap_or(0);
    }
    pub(super) fn total_pages(&self) -> usize {
        self.pages.iter().map(Vec::len).sum()
    }
    /// Pool pages needed so that every buffer has `target` pages.
    pub(super) fn missing(&self, target: usize) -> usize {
        if self.min_pages >= target {
            // Every buffer has enough (the common case of a decode step): no need to look.
            return 0;
        }
        self.pages
            .iter()
            .map(|p| target.saturating_sub(p.len()))
            .sum()
    }
}
