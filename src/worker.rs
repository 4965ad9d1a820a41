//! kvvm's background threads (the cache's mapper, the pool's refill thread, the swap engine's
//! completion and staging threads, the host backend's copy workers): one way to start them and
//! one way to wait for them.
//!
//! Each owner keeps its own stop signal (a flag under its lock, or a channel it closes); a
//! [`Worker`] only names the thread, turns a failed spawn into [`Error::ThreadSpawn`], and joins
//! it exactly once, logging instead of propagating a panic, so that `Drop` never panics.

use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::fork::ForkGuard;

/// A named background thread, joined on [`Worker::join`] or when dropped.
#[derive(Debug)]
pub(crate) struct Worker {
    name: &'static str,
    handle: Option<JoinHandle<()>>,
    /// In a forked child the thread does not exist: it is forgotten, never joined.
    fork: ForkGuard,
}

impl Worker {
    /// Starts `body` on a thread called `name`.
    ///
    /// # Errors
    /// [`Error::ThreadSpawn`] when the system refuses a new thread.
    pub(crate) fn spawn(name: &'static str, body: impl FnOnce() + Send + 'static) -> Result<Self> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(body)
            .map_err(|e| Error::ThreadSpawn {
                thread: name,
                message: e.to_string(),
            })?;
        Ok(Worker {
            name,
            handle: Some(handle),
            fork: ForkGuard::new(),
        })
    }

    /// Waits for the thread to end (the owner must have signalled it to stop). Idempotent.
    pub(crate) fn join(&mut self) {
        if let Some(h) = self.handle.take() {
            if self.fork.inherited() {
                // The thread stayed in the parent process: joining it here would wait forever.
                std::mem::forget(h);
                return;
            }
            if h.join().is_err() {
                tracing::error!("kvvm background thread {} panicked", self.name);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.join();
    }
}
