//! Submitting copies: chunking, and on the host backend the staging thread that populates page
//! tables and submits a swap-in chunk by chunk so that `swap_in` returns at once.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::cache::PendingPages;

use crate::error::{Error, Result};
use crate::vmm::{Backend, Completion, CopyKind, CopyRegion, Fence};

use super::{Inner, Timers};

use super::ticket::wait_all;

/// Asks the kernel to fill in the page tables of `[addr, addr+len)` (`MADV_POPULATE_READ`), so
/// that a copy into freshly mapped host-backend pages does not take one page fault per OS page.
/// The pages are shared memfd pages already allocated, which a read fault maps writable and with
/// fault-around (several pages per fault): on the machine this was measured on, populating
/// 128 MiB took 10 ms this way, 20 ms with `MADV_POPULATE_WRITE` and 130 ms through faults in
/// the copy itself. Best effort: without it (kernels before 5.14) the copy takes the faults.
pub(super) fn prefault(addr: u64, len: usize) {
    // SAFETY: madvise does not touch Rust-visible memory; the caller passes a range of pages
    // mapped read/write for a busy slot, and populating them changes no byte.
    let r = unsafe {
        libc::madvise(
            addr as usize as *mut libc::c_void,
            len,
            libc::MADV_POPULATE_READ,
        )
    };
    if r != 0 {
        tracing::trace!(
            "MADV_POPULATE_READ failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Submits `regions` (`kind`) in one call (none if empty), after `after` on the device.
pub(super) fn submit(
    backend: &dyn Backend,
    kind: CopyKind,
    regions: &[CopyRegion],
    after: Option<&dyn Fence>,
) -> Result<Vec<Box<dyn Completion>>> {
    if regions.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: forwarded from the caller, who upholds `copy_async`'s contract for `regions`.
    Ok(vec![unsafe {
        backend.copy_async_after(kind, regions, after)
    }?])
}

/// A host-backend swap-in's copies, submitted by the engine's staging thread one chunk at a
/// time after populating the chunk's page tables (see [`prefault`]), so that `swap_in` returns
/// at once and populating a chunk overlaps copying the previous one.
#[derive(Debug, Default)]
pub(super) struct Staged {
    /// Set once every chunk is submitted (or submission failed): the copies and the
    /// submission error.
    pub(super) done: Mutex<Option<Submitted>>,
    pub(super) cv: Condvar,
}

/// What the staging thread submitted for one swap-in: the copies, and the submission error.
pub(super) type Submitted = (Arc<Vec<Box<dyn Completion>>>, Option<Error>);

/// The [`Completion`] of a [`Staged`] swap-in.
#[derive(Debug)]
pub(super) struct StagedCompletion(pub(super) Arc<Staged>);

impl StagedCompletion {
    pub(super) fn submitted(&self, block: bool) -> Option<Submitted> {
        let mut done = self.0.done.lock().unwrap_or_else(|p| p.into_inner());
        while block && done.is_none() {
            done = self.0.cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
        done.clone()
    }
}

impl Completion for StagedCompletion {
    fn poll(&self) -> Result<bool> {
        let Some((copies, submit_err)) = self.submitted(false) else {
            return Ok(false);
        };
        let mut first_err = None;
        for c in copies.iter() {
            match c.poll() {
                Ok(false) => return Ok(false),
                Ok(true) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        submit_err.or(first_err).map_or(Ok(true), Err)
    }

    fn wait(&self) -> Result<()> {
        let (copies, submit_err) = self
            .submitted(true)
            .unwrap_or_else(|| (Arc::new(Vec::new()), None));
        let copied = wait_all(&copies);
        submit_err.map_or(copied, Err)
    }
}

/// One swap-in for the staging thread.
#[derive(Debug)]
pub(super) struct StageJob {
    pub(super) staged: Arc<Staged>,
    pub(super) regions: Vec<CopyRegion>,
    /// Per region: the buffer it writes and where it ends, in bytes from the slot's start.
    pub(super) marks: Vec<(usize, usize)>,
    /// The slot's pages not mapped yet: each chunk's are mapped just before its copy.
    pub(super) pages: Option<PendingPages>,
    /// Populate each chunk's page tables before its copy: the swap-in mapped pages (a slot
    /// whose pages were all mapped before, e.g. kept by a swap-out, has its tables already).
    pub(super) populate: bool,
}

/// The staging thread: maps, populates and submits each job's chunks in order.
pub(super) fn stage(inner: Arc<Inner>, rx: crossbeam_channel::Receiver<StageJob>) {
    let backend = inner.backend();
    backend.prepare_thread();
    let page = inner.cache.geometry().page_size;
    for mut job in rx {
        let mut copies: Vec<Box<dyn Completion>> = Vec::with_capacity(job.regions.len());
        let mut error = None;
        for (r, &(b, end)) in job.regions.iter().zip(&job.marks) {
            if let Some(p) = job.pages.as_mut() {
                // Every page under this chunk is mapped before its copy is submitted (chunks
                // of a buffer come in address order, so those below it are mapped already).
                let t0 = Instant::now();
                let mapped = inner.cache.swap_in_map(p, b, end.div_ceil(page));
                Timers::add(&inner.timers.map_ns, t0);
                if let Err(e) = mapped {
                    error = Some(e);
                    break;
                }
            }
            if job.populate {
                let t0 = Instant::now();
                prefault(r.dst, r.len);
                Timers::add(&inner.timers.populate_ns, t0);
            }
            // SAFETY: `swap_in` built these regions under `copy_async`'s contract: the slot
            // (destination) and the host copy (source) stay busy until the transfer finishes,
            // which waits for this job's completion, hence for every copy submitted here; the
            // destination's pages were mapped just above (or by `swap_in`).
            match unsafe { backend.copy_async(CopyKind::HostToDevice, std::slice::from_ref(r)) } {
                Ok(c) => copies.push(c),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if let Some(mut p) = job.pages.take() {
            // Chunks cover every page the tokens need; map any left over all the same (the
            // slot must hold the pages `swap_in_begin_with` promised), then return the unused.
            if error.is_none() {
                let t0 = Instant::now();
                if let Err(e) = inner.cache.swap_in_map_all(&mut p) {
                    error = Some(e);
                }
                Timers::add(&inner.timers.map_ns, t0);
            }
            inner.cache.swap_in_unused(p);
        }
        *job.staged.done.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Arc::new(copies), error));
        job.staged.cv.notify_all();
    }
}

/// Appends `[src, src+len)` → `[dst, dst+len)` to `out` in pieces of at most `chunk` bytes.
pub(super) fn push_chunked(
    out: &mut Vec<CopyRegion>,
    dst: u64,
    src: u64,
    len: usize,
    chunk: usize,
) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk);
        out.push(CopyRegion {
            dst: dst + done as u64,
            src: src + done as u64,
            len: n,
        });
        done += n;
    }
}
