//! `fork()` awareness: objects made before a fork belong to the parent process.
//!
//! After `fork()` the child has copies of the parent's kvvm objects but not their threads, and
//! it shares the parent's memfd pages (`MAP_SHARED`): a child that used them would hang joining
//! threads it does not have, or write and release pages the parent still uses. So every object
//! records the fork generation it was made in; in a child (where the generation moved on, see
//! [`generation`]) calls fail with [`Error::InvalidArgument`] and dropping only forgets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Bumped in the child of every `fork()` (a `pthread_atfork` child handler).
static GENERATION: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The current fork generation (0 in the process that first used kvvm).
pub(crate) fn generation() -> u64 {
    INSTALL.call_once(|| {
        // SAFETY: registers a child handler that only increments an atomic (async-signal-safe,
        // as a handler running in the child of a multi-threaded process must be); the handler
        // is a plain function that lives for the whole process.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!("pthread_atfork failed ({rc}): fork() is not detected");
        }
    });
    GENERATION.load(Ordering::Relaxed)
}

/// The fork generation an object was made in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForkGuard(u64);

impl ForkGuard {
    /// Records the current generation.
    pub(crate) fn new() -> Self {
        ForkGuard(generation())
    }

    /// True in a child process forked after the object was made.
    pub(crate) fn inherited(&self) -> bool {
        GENERATION.load(Ordering::Relaxed) != self.0
    }

    /// [`Error::InvalidArgument`] in a child process forked after the object was made.
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        if self.inherited() {
            return Err(Error::InvalidArgument(format!(
                "this {what} was created in the parent process; after fork() it cannot be used \
                 in the child (create a new one there)"
            )));
        }
        Ok(())
    }
}
