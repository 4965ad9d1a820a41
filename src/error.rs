//! The error type shared by every layer of kvvm.

use crate::cache::SlotId;
use crate::kind::{BackendKind, BackendOp};

/// Result alias used throughout kvvm.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kvvm.
///
/// Every variant leaves the object that returned it in the state it had before the call, unless
/// the variant's documentation says otherwise.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backend call failed (a system call on the host backend, a driver call on CUDA).
    #[error("{op} failed on the {backend} backend: {message}")]
    Backend {
        /// Which backend.
        backend: BackendKind,
        /// Which operation.
        op: BackendOp,
        /// The OS `errno` (host) or `CUresult` (CUDA), 0 when not applicable.
        code: i64,
        /// Human readable description, including the driver's error name on CUDA.
        message: String,
    },
    /// The CUDA driver could not be loaded or used.
    #[error(transparent)]
    Driver(#[from] kvvm_sys::DriverError),
    /// The physical page budget cannot supply the pages that were asked for.
    #[error(
        "page budget exhausted: {needed} pages needed, {available} available \
         (budget {budget_bytes} bytes, page {page_size} bytes)"
    )]
    BudgetExhausted {
        /// Pages asked for.
        needed: usize,
        /// Pages that could still be supplied (free plus creatable within the budget).
        available: usize,
        /// The pool's budget in bytes.
        budget_bytes: u64,
        /// The pool's page size in bytes.
        page_size: usize,
    },
    /// Mapping more would exceed `vm.max_map_count` (host backend).
    #[error(
        "vm.max_map_count headroom exhausted: {in_use} mappings in use, {needed} more needed, \
         limit {limit} (raise it with `sysctl vm.max_map_count`, or use larger pages)"
    )]
    MapCountExhausted {
        /// Mappings (VMAs) the process holds now.
        in_use: usize,
        /// Mappings the operation would add at most.
        needed: usize,
        /// The effective limit (the sysctl minus a safety reserve for the rest of the process).
        limit: usize,
    },
    /// The pinned host arena cannot hold what was asked.
    #[error("host memory budget exhausted: {needed} bytes needed, {available} available (budget {budget_bytes} bytes)")]
    HostBudgetExhausted {
        /// Bytes asked for.
        needed: u64,
        /// Bytes that could be supplied after evicting everything evictable.
        available: u64,
        /// The arena's budget in bytes.
        budget_bytes: u64,
    },
    /// Growing a slot failed; nothing was changed.
    #[error("slot {slot}: {missing_pages} pages missing: {source}")]
    Grow {
        /// The slot that could not grow.
        slot: SlotId,
        /// How many pages it lacked.
        missing_pages: usize,
        /// Why they could not be mapped.
        source: Box<Error>,
    },
    /// Every slot is allocated.
    #[error("no free slot: all {max_slots} slots are allocated")]
    SlotsExhausted {
        /// The cache's slot count.
        max_slots: usize,
    },
    /// A slot index at or above the cache's `max_slots`.
    #[error("slot {slot} out of range (max_slots {max_slots})")]
    SlotOutOfRange {
        /// The slot asked for.
        slot: SlotId,
        /// The cache's slot count.
        max_slots: usize,
    },
    /// The slot exists but is not allocated (never allocated, freed, or swapped out).
    #[error("slot {slot} is not allocated")]
    SlotNotAllocated {
        /// The slot asked for.
        slot: SlotId,
    },
    /// A token at or beyond the slot's live tokens (pages there may be reclaimed at any time).
    #[error("token {token} of slot {slot} is not a live token (the slot holds {live})")]
    TokenNotLive {
        /// The slot.
        slot: SlotId,
        /// The token asked for.
        token: usize,
        /// The slot's live tokens.
        live: usize,
    },
    /// A background thread (mapper, page pool, copy workers, swap completion) could not be
    /// started; the object being created was not created.
    #[error("cannot start the {thread} thread: {message}")]
    ThreadSpawn {
        /// The thread's name.
        thread: &'static str,
        /// The operating system's reason.
        message: String,
    },
    /// A configuration that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An argument out of range or an object in the wrong state for the call.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation is not supported by this backend or build.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A failure injected by `kvvm::vmm::faulty::FaultyBackend` (feature `testing`).
    #[cfg(feature = "testing")]
    #[error("injected fault in {op}")]
    Injected {
        /// The operation that was made to fail.
        op: BackendOp,
    },
    /// A bug inside kvvm was caught (a panic in a background step); the state it names may need
    /// to be rebuilt.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// True for the errors that mean "out of a resource" (budget, map count, host arena, device
    /// memory): the caller may free something and retry.
    pub fn is_exhaustion(&self) -> bool {
        match self {
            Error::BudgetExhausted { .. }
            | Error::MapCountExhausted { .. }
            | Error::HostBudgetExhausted { .. }
            | Error::ThreadSpawn { .. } => true,
            Error::Backend { code, backend, .. } => match backend {
                BackendKind::Host => *code == libc::ENOMEM as i64,
                BackendKind::Cuda => *code == kvvm_sys::CUDA_ERROR_OUT_OF_MEMORY as i64,
            },
            Error::Grow { source, .. } => source.is_exhaustion(),
            _ => false,
        }
    }
}
