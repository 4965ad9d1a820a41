//! Virtual-memory backends: the one interface the rest of kvvm uses to reserve address space,
//! create physical pages, map and unmap them, allocate pinned host buffers and copy bytes.
//!
//! The contract mirrors the CUDA driver's virtual-memory management API, so that the host backend
//! exercises exactly the logic that runs on a GPU:
//!
//! | call | CUDA ([`cuda`]) | host ([`host`]) |
//! | --- | --- | --- |
//! | [`Backend::granularity`] | `cuMemGetAllocationGranularity(MINIMUM)` | configured, multiple of the OS page |
//! | [`Backend::reserve`] | `cuMemAddressReserve` | `mmap(PROT_NONE, MAP_NORESERVE)` |
//! | [`Backend::create_page`] | `cuMemCreate` | an extent of one memfd arena |
//! | [`Backend::map`] | `cuMemMap` per page + one `cuMemSetAccess` per run | one `mmap(MAP_FIXED)` per run of consecutive arena offsets |
//! | [`Backend::unmap`] | `cuMemUnmap` | `mmap(PROT_NONE, MAP_FIXED)` over the range |
//! | [`Backend::protect`] | `cuMemSetAccess` (read or read/write) | `mprotect` |
//! | [`Backend::release_page`] | `cuMemRelease` | `fallocate(PUNCH_HOLE)` |
//! | [`Backend::alloc_host`] | `cuMemHostAlloc` | anonymous memory |
//! | [`Backend::copy_async`] | `cuMemcpy*Async` on a stream + event | worker threads |
//!
//! Contract common to all backends:
//! - Every method returns a typed [`Error`] on failure and then has changed nothing (a failed
//!   [`Backend::map`] leaves the whole range unmapped; a failed [`Backend::unmap`] leaves it as it
//!   was as far as the platform allows and reports it).
//! - A page may be mapped at several addresses at once (aliasing); bytes written through one
//!   mapping are visible through every other. A mapping may be read-only ([`Access::ReadOnly`]):
//!   a write through it faults (host: `SIGSEGV`; CUDA: an illegal-address error of the kernel),
//!   which is how shared prefix pages are kept from being corrupted by one of their users.
//! - Unmapping never destroys a page's contents; releasing does.
//! - All methods may be called from several threads at once.
//!
//! [`faulty::FaultyBackend`] wraps any backend and makes chosen calls fail, for tests.

pub mod cuda;
#[cfg(feature = "testing")]
pub mod faulty;
pub mod host;
mod metered;

pub use crate::kind::{BackendKind, BackendOp};
pub(crate) use metered::mark_background_thread;
pub use metered::{MeteredBackend, OpStats};

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A range of virtual addresses returned by [`Backend::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VaRange {
    /// First address (device address on CUDA, process address on host).
    pub addr: u64,
    /// Length in bytes, a multiple of the granularity.
    pub len: usize,
}

impl VaRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.addr + self.len as u64
    }
    /// Whether `[addr, addr+len)` lies inside this range.
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        addr >= self.addr
            && (len as u64) <= self.len as u64
            && addr - self.addr <= (self.len - len) as u64
    }
}

/// Access rights of a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reads and writes (what [`Backend::map`] gives).
    #[default]
    ReadWrite,
    /// Reads only: a write faults.
    ReadOnly,
}

/// A physical page created by [`Backend::create_page`].
///
/// The handle is an identifier, not a capability: using a handle with a backend that did not
/// create it, or after releasing it, gives an error or maps meaningless bytes, never undefined
/// behaviour. It is deliberately neither `Copy` nor `Clone`, so that ownership of a page is
/// tracked by the type system inside kvvm: a page with several owners (shared prefix pages) has
/// one handle per owner, handed out and counted by [`crate::pool::PagePool::share`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PageHandle {
    raw: u64,
    size: usize,
}

impl PageHandle {
    /// Wraps a backend-specific identifier (host: arena offset; CUDA:
    /// `CUmemGenericAllocationHandle`).
    pub fn from_raw(raw: u64, size: usize) -> Self {
        PageHandle { raw, size }
    }
    /// The backend-specific identifier.
    pub fn raw(&self) -> u64 {
        self.raw
    }
    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// A host buffer from [`Backend::alloc_host`]: page-locked on CUDA, ordinary memory on host.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HostBuffer {
    ptr: u64,
    len: usize,
}

impl HostBuffer {
    /// Wraps a pointer returned by a backend's allocator.
    pub fn from_raw(ptr: u64, len: usize) -> Self {
        HostBuffer { ptr, len }
    }
    /// Address of the first byte, valid in this process.
    pub fn addr(&self) -> u64 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Direction of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyKind {
    /// From mapped device memory to a host buffer.
    DeviceToHost,
    /// From a host buffer to mapped device memory.
    HostToDevice,
    /// Between two device ranges.
    DeviceToDevice,
}

/// One contiguous copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyRegion {
    /// Destination address.
    pub dst: u64,
    /// Source address.
    pub src: u64,
    /// Bytes to copy.
    pub len: usize,
}

/// Completion of an asynchronous copy submitted with [`Backend::copy_async`].
pub trait Completion: Send + Sync + fmt::Debug {
    /// `Ok(true)` once every region has been copied, `Ok(false)` while in flight, the error if any
    /// region failed. Never blocks.
    fn poll(&self) -> Result<bool>;
    /// Blocks until the copy is complete; returns its error if it failed.
    fn wait(&self) -> Result<()>;
    /// On CUDA, the raw `CUevent` recorded after the copy, which a caller's stream may wait on
    /// with `cuStreamWaitEvent`. `None` on backends without events.
    fn event(&self) -> Option<u64> {
        None
    }
}

/// A point in the caller's stream (see `docs/ordering.md`): complete once the work the caller
/// queued there before it was made has run. Made by [`Backend::record_fence`] or
/// [`Backend::fence_after_event`]; backends whose caller works on the host (the host backend)
/// make none, because everything the caller did before a call is done when it calls.
pub trait Fence: Send + Sync + fmt::Debug {
    /// `Ok(true)` once complete, `Ok(false)` while not. Never blocks (CUDA: `cuEventQuery`).
    fn poll(&self) -> Result<bool>;
    /// Blocks until complete (CUDA: `cuEventSynchronize`).
    fn wait(&self) -> Result<()>;
    /// The raw event behind the fence (CUDA: a `CUevent`), for `cuStreamWaitEvent`.
    fn event(&self) -> u64;
}

/// Reserved ranges and the pages mapped in them, handed over by [`Backend::detach`] to an owner
/// that does not need the backend: until this is dropped the ranges stay reserved and the pages
/// mapped (their contents readable and writable as before); dropping it unmaps the ranges, frees
/// them and the pages' memory (on CUDA after `cuCtxSynchronize`, so that no queued kernel still
/// reads them). In a child process forked after the hand-over, dropping it does nothing.
pub trait Detached: Send + Sync + fmt::Debug {}

/// What [`Backend::detach`] hands back when it refuses: the caller still owns both.
pub type DetachRefused = (Vec<VaRange>, Vec<PageHandle>);

/// Facts about a backend, for `kvvm info` and statistics.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BackendInfo {
    /// Which backend.
    pub kind: BackendKind,
    /// Device name (CPU model on host).
    pub device_name: String,
    /// Device ordinal (0 on host).
    pub device_ordinal: i32,
    /// Mapping unit in bytes.
    pub granularity: usize,
    /// Total device memory in bytes (physical RAM on host).
    pub total_memory: u64,
    /// `vm.max_map_count` on host, `None` where the limit does not apply.
    pub max_map_count: Option<usize>,
    /// Mappings the process may still add before the backend refuses, `None` where it does not
    /// apply (host: from a pessimistic estimate, a lower bound; [`Backend::map_headroom`]
    /// counts).
    pub map_headroom: Option<usize>,
    /// Bytes of new pages the backend can still back: on host the smaller of `MemAvailable`
    /// and what the process's memory cgroup (and its ancestors) still allows; `None` where
    /// unknown. A page budget above it is refused when a cache or pool is made.
    pub usable_memory: Option<u64>,
}

/// A virtual-memory backend. See the [module documentation](self) for the contract.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Describes the backend and its device.
    fn info(&self) -> BackendInfo;

    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The mapping unit in bytes: every reservation, page and mapping is a multiple of it.
    fn granularity(&self) -> usize;

    /// Reserves `len` bytes of virtual address space with no memory behind it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `len` is zero or not a multiple of the granularity; a
    /// backend error when the address space is exhausted.
    fn reserve(&self, len: usize) -> Result<VaRange>;

    /// Gives a reservation back. Everything mapped in it must have been unmapped.
    ///
    /// # Errors
    /// A backend error; the reservation is then still held.
    fn free_reservation(&self, range: VaRange) -> Result<()>;

    /// Creates a physical page of `size` bytes (a multiple of the granularity).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad size; a backend error when memory is exhausted.
    fn create_page(&self, size: usize) -> Result<PageHandle>;

    /// Returns a page's memory to the system. The page must not be mapped anywhere.
    ///
    /// # Errors
    /// A backend error; the page is then still valid and owned by the caller, who may retry.
    fn release_page(&self, page: PageHandle) -> std::result::Result<(), (PageHandle, Error)>;

    /// Maps `pages` at consecutive addresses starting at `va`, with read/write access.
    ///
    /// `va` must lie in a reservation of this backend, be aligned to the granularity, and the
    /// range `[va, va + sum of sizes)` must be currently unmapped.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a misaligned or unreserved range,
    /// [`Error::MapCountExhausted`] (host) before the kernel's limit is reached, or a backend
    /// error. On error nothing of the range is mapped.
    fn map(&self, va: u64, pages: &[&PageHandle]) -> Result<()>;

    /// Unmaps `[va, va+len)`, which must consist of whole pages mapped by [`Backend::map`] (the
    /// pages of one `map` call may be unmapped in several parts). The range reverts to
    /// reserved-without-access. Page contents are kept.
    ///
    /// On CUDA the caller must make sure no kernel still reads the range.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a misaligned or unreserved range, or a backend error.
    fn unmap(&self, va: u64, len: usize) -> Result<()>;

    /// [`Backend::map`] with the given access rights (read-only for pages shared between slots).
    ///
    /// The provided implementation maps read/write and then calls [`Backend::protect`]; backends
    /// override it to do both at once.
    ///
    /// # Errors
    /// As [`Backend::map`] and [`Backend::protect`]; on error nothing of the range is mapped
    /// (unless undoing the mapping failed too, which is logged).
    fn map_with_access(&self, va: u64, pages: &[&PageHandle], access: Access) -> Result<()> {
        self.map(va, pages)?;
        if access != Access::ReadWrite {
            let len: usize = pages.iter().map(|p| p.size()).sum();
            if let Err(e) = self.protect(va, len, access) {
                if let Err(u) = self.unmap(va, len) {
                    tracing::warn!("undoing a mapping whose protection failed: {u}");
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Changes the access rights of `[va, va+len)`, which must consist of whole pages mapped by
    /// [`Backend::map`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a misaligned or unreserved range, or a backend error; the
    /// provided implementation refuses (a backend that cannot protect cannot share pages safely).
    fn protect(&self, va: u64, len: usize, access: Access) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "the {} backend cannot set {access:?} access on {va:#x}+{len:#x}",
            self.kind()
        )))
    }

    /// Allocates a host buffer usable as the host side of [`Backend::copy_async`] (page-locked on
    /// CUDA).
    ///
    /// # Errors
    /// A backend error when host memory is exhausted.
    fn alloc_host(&self, len: usize) -> Result<HostBuffer>;

    /// Frees a buffer from [`Backend::alloc_host`]. No copy may be in flight on it.
    ///
    /// # Errors
    /// A backend error; the buffer is then still allocated and returned.
    fn free_host(&self, buf: HostBuffer) -> std::result::Result<(), (HostBuffer, Error)>;

    /// Starts copying `regions` asynchronously and returns its completion.
    ///
    /// Regions are copied in any order and possibly in parallel; they must not overlap each other's
    /// destinations.
    ///
    /// # Safety
    /// Until the returned completion reports done (or is waited on), every source range must stay
    /// mapped and readable, every destination range mapped and writable, and no one else may write
    /// the destination ranges or the source ranges. Device ranges must be mapped by this backend;
    /// host ranges must lie in buffers from [`Backend::alloc_host`] (host backend: any memory of this
    /// process).
    ///
    /// # Errors
    /// A backend error if the copy cannot be submitted; failures during the copy are reported by
    /// the completion.
    unsafe fn copy_async(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
    ) -> Result<Box<dyn Completion>>;

    /// Waits until all work this backend submitted to the device is finished (CUDA:
    /// `cuCtxSynchronize`; host: a no-op, copies are tracked by their completions).
    ///
    /// # Errors
    /// A backend error.
    fn synchronize(&self) -> Result<()>;

    /// How many more mappings the process may make before [`Backend::map`] refuses; `None` where
    /// no such limit applies.
    fn map_headroom(&self) -> Option<usize> {
        None
    }

    /// Records a fence on the caller's `stream` (a raw `CUstream`; 0 is the legacy default
    /// stream) after the work queued there so far. `None` when the backend needs none (host).
    ///
    /// # Errors
    /// A backend error (e.g. the stream does not exist).
    fn record_fence(&self, stream: u64) -> Result<Option<Arc<dyn Fence>>> {
        let _ = stream;
        Ok(None)
    }

    /// A fence that completes when the caller's `event` (a raw `CUevent`), as last recorded before
    /// this call, completes. `None` when the backend needs none (host).
    ///
    /// # Errors
    /// A backend error (e.g. the event does not exist).
    fn fence_after_event(&self, event: u64) -> Result<Option<Arc<dyn Fence>>> {
        let _ = event;
        Ok(None)
    }

    /// Makes the caller's `stream` wait (on the device) for `event`, an event of this backend
    /// (`cuStreamWaitEvent`). The host backend has no streams: it does nothing.
    ///
    /// # Errors
    /// A backend error.
    fn stream_wait_event(&self, stream: u64, event: u64) -> Result<()> {
        let _ = (stream, event);
        Ok(())
    }

    /// [`Backend::copy_async`] whose copies start only after `after` has completed (CUDA: the
    /// copy stream waits on the fence's event, so the call does not block). The default waits
    /// for the fence on the host first.
    ///
    /// # Safety
    /// As [`Backend::copy_async`].
    ///
    /// # Errors
    /// As [`Backend::copy_async`], and the fence's error.
    unsafe fn copy_async_after(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
        after: Option<&dyn Fence>,
    ) -> Result<Box<dyn Completion>> {
        if let Some(f) = after {
            f.wait()?;
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.copy_async(kind, regions) }
    }

    /// Hands `ranges` (whole reservations of this backend) and `pages` (live pages of this
    /// backend, each mapped somewhere in `ranges` and nowhere else) over to a [`Detached`] owner
    /// that keeps them mapped without the backend: the backend forgets them (it neither frees
    /// nor reuses them), and may be dropped before the owner. This is how a cache's exported
    /// tensors (DLPack) outlive the cache without keeping its threads and files.
    ///
    /// # Errors
    /// The ranges and pages, untouched, when the backend cannot detach (the provided
    /// implementation always refuses; wrappers forward to the backend they wrap) or they are not
    /// what it made.
    fn detach(
        &self,
        ranges: Vec<VaRange>,
        pages: Vec<PageHandle>,
    ) -> std::result::Result<Box<dyn Detached>, DetachRefused> {
        Err((ranges, pages))
    }

    /// Prepares a thread of kvvm's own (background mapper, unmapper, swap threads) before its
    /// first call (CUDA: the device's context made current, and the relaxed stream-capture mode,
    /// so that an engine capturing CUDA graphs is never disturbed by kvvm's calls).
    fn prepare_thread(&self) {}
}

/// Which backend to open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum BackendChoice {
    /// CUDA when the driver loads and a device with virtual-memory management exists, else host.
    /// The environment variable `KVVM_BACKEND=host|cuda` overrides `Auto`.
    #[default]
    Auto,
    /// The host backend.
    Host,
    /// The CUDA backend; fails if no usable device exists.
    Cuda,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(BackendChoice::Auto),
            "host" | "cpu" => Ok(BackendChoice::Host),
            "cuda" | "gpu" => Ok(BackendChoice::Cuda),
            other => Err(Error::InvalidConfig(format!(
                "unknown backend {other:?} (expected auto, host or cuda)"
            ))),
        }
    }
}

/// Options for [`open`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    /// Which backend.
    pub choice: BackendChoice,
    /// Host backend: mapping unit in bytes (a multiple of the OS page). Default 2 MiB.
    pub host_granularity: usize,
    /// CUDA backend: device ordinal. Default 0.
    pub device: i32,
    /// Host backend: worker threads for copies. Default: 4.
    pub copy_threads: usize,
    /// Back reserved-but-unmapped ranges with zeros, read-only, so that a stray read returns
    /// zeros instead of faulting (CUDA: one physical zero page mapped read-only behind every
    /// unmapped page; host: an anonymous read-only mapping). Writes still fault. Default: on.
    pub zero_page: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            choice: BackendChoice::Auto,
            host_granularity: host::DEFAULT_GRANULARITY,
            device: 0,
            copy_threads: 4,
            zero_page: true,
        }
    }
}

/// The environment variable that overrides [`BackendChoice::Auto`].
pub const BACKEND_ENV: &str = "KVVM_BACKEND";

/// Resolves [`BackendChoice::Auto`] through [`BACKEND_ENV`].
///
/// # Errors
/// [`Error::InvalidConfig`] if the variable holds an unknown name.
pub fn resolve_choice(choice: BackendChoice) -> Result<BackendChoice> {
    if choice != BackendChoice::Auto {
        return Ok(choice);
    }
    match std::env::var(BACKEND_ENV) {
        Ok(v) => v.parse(),
        Err(_) => Ok(BackendChoice::Auto),
    }
}

/// Opens the backend `config` asks for.
///
/// `Auto` (after the environment override) tries CUDA and falls back to host when the driver does
/// not load or no device supports virtual-memory management.
///
/// # Errors
/// Any error of the chosen backend's constructor; with `Auto`, only the host backend's.
pub fn open(config: &BackendConfig) -> Result<Arc<dyn Backend>> {
    match resolve_choice(config.choice)? {
        BackendChoice::Host => Ok(Arc::new(host::HostBackend::new(host::HostConfig {
            granularity: config.host_granularity,
            copy_threads: config.copy_threads,
            zero_page: config.zero_page,
            ..host::HostConfig::default()
        })?)),
        BackendChoice::Cuda => Ok(Arc::new(cuda::CudaBackend::with_zero_page(
            config.device,
            config.zero_page,
        )?)),
        BackendChoice::Auto => {
            match cuda::CudaBackend::with_zero_page(config.device, config.zero_page) {
                Ok(b) => Ok(Arc::new(b)),
                Err(e) => {
                    tracing::debug!("CUDA backend unavailable ({e}); using the host backend");
                    open(&BackendConfig {
                        choice: BackendChoice::Host,
                        ..config.clone()
                    })
                }
            }
        }
    }
}

/// Checks that `len` is a positive multiple of `granularity`.
pub(crate) fn check_multiple(what: &str, len: usize, granularity: usize) -> Result<()> {
    if len == 0 || len % granularity != 0 {
        return Err(Error::InvalidArgument(format!(
            "{what} of {len} bytes is not a positive multiple of the granularity {granularity}"
        )));
    }
    Ok(())
}
