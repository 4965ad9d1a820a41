//! A backend wrapper that makes chosen calls fail, for tests.
//!
//! ```
//! use std::sync::Arc;
//! use kvvm::vmm::{Backend, BackendOp, faulty::FaultyBackend, host::{HostBackend, HostConfig}};
//!
//! let host = Arc::new(HostBackend::new(HostConfig::default())?);
//! let faulty = FaultyBackend::new(host);
//! faulty.fail_nth(BackendOp::CreatePage, 2); // the second create_page from now fails
//! let a = faulty.create_page(faulty.granularity())?;
//! assert!(faulty.create_page(faulty.granularity()).is_err());
//! faulty.release_page(a).map_err(|(_, e)| e)?;
//! # Ok::<(), kvvm::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use super::{
    Access, Backend, BackendInfo, BackendKind, BackendOp, Completion, CopyKind, CopyRegion,
    DetachRefused, Detached, Fence, HostBuffer, PageHandle, VaRange,
};
use crate::error::{Error, Result};

/// When an injected copy failure shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CopyFault {
    /// `copy_async` itself returns the error; nothing is copied.
    #[default]
    AtSubmit,
    /// The copy runs (possibly partially, as far as the caller may assume) and its completion
    /// reports the error.
    AtCompletion,
}

#[derive(Debug, Clone)]
struct Rule {
    op: BackendOp,
    /// Fails when the op's call counter reaches this value.
    at: u64,
    /// Keep failing every call from `at` on.
    sticky: bool,
    error: Option<Error>,
    copy: CopyFault,
}

#[derive(Debug, Default)]
struct State {
    calls: [u64; BackendOp::COUNT],
    injected: [u64; BackendOp::COUNT],
    rules: Vec<Rule>,
}

/// Wraps a backend; every call is counted and may be made to fail. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    state: Mutex<State>,
    refuse_detach: std::sync::atomic::AtomicBool,
}

/// Outcome of counting a call.
enum Verdict {
    Pass,
    Fail(Error, CopyFault),
}

impl FaultyBackend {
    /// Wraps `inner` with no faults armed.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        FaultyBackend {
            inner,
            state: Mutex::new(State::default()),
            refuse_detach: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes [`Backend::detach`] refuse (as a backend that cannot detach does) instead of
    /// forwarding to the wrapped backend.
    pub fn refuse_detach(&self, refuse: bool) {
        self.refuse_detach
            .store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm(&self, op: BackendOp, n: u64, sticky: bool, error: Option<Error>, copy: CopyFault) {
        let mut s = self.lock();
        let at = s.calls[op as usize] + n.max(1);
        s.rules.push(Rule {
            op,
            at,
            sticky,
            error,
            copy,
        });
    }

    /// Makes the `n`-th call of `op` from now (1 = the next one) fail with [`Error::Injected`].
    pub fn fail_nth(&self, op: BackendOp, n: u64) {
        self.arm(op, n, false, None, CopyFault::AtSubmit);
    }

    /// Makes the `n`-th call of `op` from now fail with `error`.
    pub fn fail_nth_with(&self, op: BackendOp, n: u64, error: Error) {
        self.arm(op, n, false, Some(error), CopyFault::AtSubmit);
    }

    /// Makes the `n`-th copy from now fail, at submission or at completion.
    pub fn fail_nth_copy(&self, n: u64, when: CopyFault) {
        self.arm(BackendOp::Copy, n, false, None, when);
    }

    /// Makes every call of `op` from the `n`-th on fail, until [`FaultyBackend::clear`].
    pub fn fail_from(&self, op: BackendOp, n: u64) {
        self.arm(op, n, true, None, CopyFault::AtSubmit);
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// How many calls of `op` were made.
    pub fn calls(&self, op: BackendOp) -> u64 {
        self.lock().calls[op as usize]
    }

    /// How many calls of `op` were made to fail.
    pub fn injected(&self, op: BackendOp) -> u64 {
        self.lock().injected[op as usize]
    }

    fn count(&self, op: BackendOp) -> Verdict {
        let mut s = self.lock();
        s.calls[op as usize] += 1;
        let n = s.calls[op as usize];
        let hit = s
            .rules
            .iter()
            .position(|r| r.op == op && (r.at == n || (r.sticky && n >= r.at)));
        match hit {
            None => Verdict::Pass,
            Some(i) => {
                let rule = if s.rules[i].sticky {
                    s.rules[i].clone()
                } else {
                    s.rules.remove(i)
                };
                s.injected[op as usize] += 1;
                Verdict::Fail(rule.error.unwrap_or(Error::Injected { op }), rule.copy)
            }
        }
    }

    fn check(&self, op: BackendOp) -> Result<()> {
        match self.count(op) {
            Verdict::Pass => Ok(()),
            Verdict::Fail(e, _) => Err(e),
        }
    }
}

#[derive(Debug)]
struct FailedCompletion {
    inner: Box<dyn Completion>,
    error: Error,
}

impl Completion for FailedCompletion {
    fn poll(&self) -> Result<bool> {
        if self.inner.poll()? {
            Err(self.error.clone())
        } else {
            Ok(false)
        }
    }
    fn wait(&self) -> Result<()> {
        self.inner.wait()?;
        Err(self.error.clone())
    }
    fn event(&self) -> Option<u64> {
        self.inner.event()
    }
}

impl Backend for FaultyBackend {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn granularity(&self) -> usize {
        self.inner.granularity()
    }
    fn reserve(&self, len: usize) -> Result<VaRange> {
        self.check(BackendOp::Reserve)?;
        self.inner.reserve(len)
    }
    fn free_reservation(&self, range: VaRange) -> Result<()> {
        self.check(BackendOp::FreeReservation)?;
        self.inner.free_reservation(range)
    }
    fn detach(
        &self,
        ranges: Vec<VaRange>,
        pages: Vec<PageHandle>,
    ) -> std::result::Result<Box<dyn Detached>, DetachRefused> {
        if self
            .refuse_detach
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err((ranges, pages));
        }
        self.inner.detach(ranges, pages)
    }
    fn create_page(&self, size: usize) -> Result<PageHandle> {
        self.check(BackendOp::CreatePage)?;
        self.inner.create_page(size)
    }
    fn release_page(&self, page: PageHandle) -> std::result::Result<(), (PageHandle, Error)> {
        match self.count(BackendOp::ReleasePage) {
            Verdict::Pass => self.inner.release_page(page),
            Verdict::Fail(e, _) => Err((page, e)),
        }
    }
    fn map(&self, va: u64, pages: &[&PageHandle]) -> Result<()> {
        self.check(BackendOp::Map)?;
        self.inner.map(va, pages)
    }
    fn map_with_access(&self, va: u64, pages: &[&PageHandle], access: Access) -> Result<()> {
        self.check(BackendOp::Map)?;
        self.inner.map_with_access(va, pages, access)
    }
    fn unmap(&self, va: u64, len: usize) -> Result<()> {
        self.check(BackendOp::Unmap)?;
        self.inner.unmap(va, len)
    }
    fn protect(&self, va: u64, len: usize, access: Access) -> Result<()> {
        self.check(BackendOp::Protect)?;
        self.inner.protect(va, len, access)
    }
    fn alloc_host(&self, len: usize) -> Result<HostBuffer> {
        self.check(BackendOp::AllocHost)?;
        self.inner.alloc_host(len)
    }
    fn free_host(&self, buf: HostBuffer) -> std::result::Result<(), (HostBuffer, Error)> {
        match self.count(BackendOp::FreeHost) {
            Verdict::Pass => self.inner.free_host(buf),
            Verdict::Fail(e, _) => Err((buf, e)),
        }
    }
    unsafe fn copy_async(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
    ) -> Result<Box<dyn Completion>> {
        match self.count(BackendOp::Copy) {
            // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract.
            Verdict::Pass => unsafe { self.inner.copy_async(kind, regions) },
            Verdict::Fail(e, CopyFault::AtSubmit) => Err(e),
            Verdict::Fail(error, CopyFault::AtCompletion) => {
                // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract.
                let inner = unsafe { self.inner.copy_async(kind, regions) }?;
                Ok(Box::new(FailedCompletion { inner, error }))
            }
        }
    }
    fn synchronize(&self) -> Result<()> {
        self.check(BackendOp::Synchronize)?;
        self.inner.synchronize()
    }
    fn map_headroom(&self) -> Option<usize> {
        self.inner.map_headroom()
    }
    fn record_fence(&self, stream: u64) -> Result<Option<Arc<dyn Fence>>> {
        self.inner.record_fence(stream)
    }
    fn fence_after_event(&self, event: u64) -> Result<Option<Arc<dyn Fence>>> {
        self.inner.fence_after_event(event)
    }
    fn stream_wait_event(&self, stream: u64, event: u64) -> Result<()> {
        self.inner.stream_wait_event(stream, event)
    }
    fn prepare_thread(&self) {
        self.inner.prepare_thread()
    }
    unsafe fn copy_async_after(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
        after: Option<&dyn Fence>,
    ) -> Result<Box<dyn Completion>> {
        match self.count(BackendOp::Copy) {
            // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract.
            Verdict::Pass => unsafe { self.inner.copy_async_after(kind, regions, after) },
            Verdict::Fail(e, CopyFault::AtSubmit) => Err(e),
            Verdict::Fail(error, CopyFault::AtCompletion) => {
                // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract.
                let inner = unsafe { self.inner.copy_async_after(kind, regions, after) }?;
                Ok(Box::new(FailedCompletion { inner, error }))
            }
        }
    }
}
