//! The CUDA backend: the driver's virtual-memory management API, through [`kvvm_sys`].
//!
//! | [`Backend`] call | driver calls |
//! | --- | --- |
//! | [`CudaBackend::new`] | `cuInit`, `cuDeviceGet`, `cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)`, `cuDevicePrimaryCtxRetain`, `cuMemGetAllocationGranularity(MINIMUM)`, `cuStreamCreate(NON_BLOCKING)` × [`COPY_STREAMS`] |
//! | `reserve` / `free_reservation` | `cuMemAddressReserve` (aligned to the granularity) / `cuMemAddressFree` |
//! | `create_page` / `release_page` | `cuMemCreate` (pinned, on the device) / `cuMemRelease` |
//! | `map` | `cuMemMap` per page at consecutive offsets, then **one** `cuMemSetAccess` over the run |
//! | `unmap` | `cuMemUnmap` over the range (every page is its own `cuMemMap`, so any run of whole pages may be unmapped, in any split) |
//! | `alloc_host` / `free_host` | `cuMemHostAlloc(PORTABLE)` / `cuMemFreeHost` |
//! | `copy_async` | `cuMemcpy{HtoD,DtoH,DtoD}Async_v2` on one of [`COPY_STREAMS`] streams (round robin), then `cuEventRecord` |
//! | `synchronize` | `cuCtxSynchronize` |
//!
//! Every call first makes the device's primary context current on the calling thread, and
//! restores the thread's previous context afterwards if it had a different one (so that a
//! caller's own CUDA work on the same thread is not disturbed). The primary context is the one
//! the CUDA runtime (and so PyTorch) uses, so device addresses are shared with them.
//!
//! Driver failures become [`Error::Backend`] with the `CUresult` as `code` and the driver's
//! error name and description in `message`; failures to load the driver become
//! [`Error::Driver`].

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvvm_sys::result;
use kvvm_sys::{Bound, PrimaryContext};
use kvvm_sys::{
    CUevent, CUmemAccessDesc, CUmemAllocationProp, CUstream, DriverError,
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, CU_EVENT_BLOCKING_SYNC,
    CU_EVENT_DISABLE_TIMING, CU_MEMHOSTALLOC_PORTABLE, CU_MEM_ACCESS_FLAGS_PROT_READ,
    CU_MEM_ALLOC_GRANULARITY_MINIMUM, CU_MEM_LOCATION_TYPE_DEVICE, CU_STREAM_CAPTURE_MODE_RELAXED,
    CU_STREAM_NON_BLOCKING,
};

use super::{
    check_multiple, Access, Backend, BackendInfo, BackendKind, BackendOp, Completion, CopyKind,
    CopyRegion, DetachRefused, Detached, Fence, HostBuffer, PageHandle, VaRange,
};
use crate::error::{Error, Result};

/// Number of non-blocking streams each backend spreads its copies over.
pub const COPY_STREAMS: usize = 4;

/// Turns a driver error from operation `op` into a kvvm error: a failed call becomes
/// [`Error::Backend`] (code = `CUresult`, message with the entry point, the driver's error name
/// and its description); loading failures stay [`Error::Driver`].
pub fn driver_error(op: BackendOp, e: DriverError) -> Error {
    match e {
        DriverError::Call {
            code,
            name,
            description,
            function,
        } => Error::Backend {
            backend: BackendKind::Cuda,
            op,
            code: i64::from(code),
            message: format!("{function} returned {name}: {description}"),
        },
        other => Error::Driver(other),
    }
}

/// Binds the backend's context for one backend call.
fn bind_for(ctx: &PrimaryContext, op: BackendOp) -> Result<Bound> {
    ctx.bind().map_err(|e| driver_error(op, e))
}

/// Reservations handed over by [`CudaBackend::detach`](Backend::detach): holds the primary
/// context only (no stream, no thread of the backend).
#[derive(Debug)]
struct CudaDetached {
    ctx: Arc<PrimaryContext>,
    /// The mapped runs to unmap (address, length).
    unmaps: Vec<(u64, usize)>,
    ranges: Vec<VaRange>,
}

impl Detached for CudaDetached {}

impl Drop for CudaDetached {
    fn drop(&mut self) {
        let Ok(bound) = self.ctx.bind() else {
            tracing::warn!("cannot bind the context to free detached ranges: leaking them");
            return;
        };
        // Like PyTorch's expandable segments before `cuMemUnmap`: whatever was queued on any
        // stream of the context (kernels reading an exported tensor) finishes first.
        if let Err(e) = result::ctx::synchronize() {
            tracing::warn!("synchronizing before freeing detached ranges: {e}; leaking them");
            return;
        }
        for &(at, len) in &self.unmaps {
            // SAFETY: `[at, at+len)` consists of whole mappings made by the backend in ranges
            // handed over to this owner alone; the synchronization above finished every queued
            // use, and nothing uses the range afterwards.
            if let Err(e) = unsafe { result::mem::unmap(at, len) } {
                tracing::warn!("unmapping a detached range at {at:#x}: {e}");
            }
        }
        for r in &self.ranges {
            // SAFETY: the range was a whole reservation of the backend, handed over to this
            // owner alone, with nothing mapped in it any more.
            if let Err(e) = unsafe { result::mem::address_free(r.addr, r.len) } {
                tracing::warn!("freeing a detached range {:#x}: {e}", r.addr);
            }
        }
        drop(bound);
    }
}

/// A stream owned by the backend.
#[derive(Debug)]
struct Stream(CUstream);

// SAFETY: a CUstream is a driver handle usable from any thread; the driver serialises
// submissions to one stream internally.
unsafe impl Send for Stream {}
// SAFETY: as above; submitting to a stream from several threads at once is allowed.
unsafe impl Sync for Stream {}

/// Driver calls a [`CudaBackend`] made for its mappings, by entry point (for benchmarks: the cost
/// of the zero page is in these counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DriverCalls {
    /// `cuMemMap` calls.
    pub mem_map: u64,
    /// `cuMemUnmap` calls.
    pub mem_unmap: u64,
    /// `cuMemSetAccess` calls.
    pub mem_set_access: u64,
}

#[derive(Debug, Default)]
struct CallCounters {
    mem_map: AtomicU64,
    mem_unmap: AtomicU64,
    mem_set_access: AtomicU64,
}

/// The CUDA virtual-memory backend for one device. See the [module documentation](self).
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<PrimaryContext>,
    /// The physical zero page mapped read-only behind every unmapped page (`None`: off).
    zero: Option<u64>,
    /// Where fences made from a caller's event are recorded (it waits on the event first).
    fence_stream: Option<Stream>,
    calls: CallCounters,
    ordinal: i32,
    name: String,
    total_memory: u64,
    granularity: usize,
    streams: Vec<Stream>,
    next_stream: AtomicUsize,
    /// Live reservations: start address → length.
    reservations: Mutex<BTreeMap<u64, usize>>,
    /// Pages mapped by `map` (start address → size): with the zero page, mapping must first
    /// unmap the zero page's mappings, so a range that holds real pages must be refused before
    /// anything is unmapped.
    mapped: Mutex<BTreeMap<u64, usize>>,
}

impl CudaBackend {
    /// Opens device `device` (an ordinal as seen through `CUDA_VISIBLE_DEVICES`).
    ///
    /// # Errors
    /// [`Error::Driver`] when the driver cannot be loaded or initialised (e.g. no NVIDIA driver
    /// on this machine: the message names `libcuda.so.1`); [`Error::InvalidConfig`] when the
    /// device does not exist; [`Error::Unsupported`] when it lacks virtual memory management.
    pub fn new(device: i32) -> Result<Self> {
        Self::with_zero_page(device, true)
    }

    /// [`CudaBackend::new`], with or without the zero page behind unmapped ranges
    /// ([`crate::vmm::BackendConfig::zero_page`]).
    ///
    /// # Errors
    /// As [`CudaBackend::new`]; a driver error if the zero page cannot be created.
    pub fn with_zero_page(device: i32, zero_page: bool) -> Result<Self> {
        result::init()?;
        let count = result::device::count()?;
        if device < 0 || device >= count {
            return Err(Error::InvalidConfig(format!(
                "CUDA device {device} does not exist: {count} device(s) visible \
                 (check CUDA_VISIBLE_DEVICES)"
            )));
        }
        let dev = result::device::get(device)?;
        let name = result::device::name(dev)?;
        let vmm = result::device::attribute(
            dev,
            CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        )?;
        if vmm == 0 {
            return Err(Error::Unsupported(format!(
                "CUDA device {device} ({name}) does not support virtual memory management \
                 (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)"
            )));
        }
        let total_memory = result::device::total_mem(dev)? as u64;
        // From here on, dropping `ctx` (or the backend) releases the primary context.
        let ctx = Arc::new(PrimaryContext::retain(device)?);
        let bound = ctx.bind()?;
        let prop = CUmemAllocationProp::pinned_device(dev);
        let granularity =
            result::mem::get_allocation_granularity(&prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM)?;
        if granularity == 0 {
            return Err(Error::Unsupported(format!(
                "CUDA device {device} ({name}) reports an allocation granularity of 0"
            )));
        }
        let mut backend = CudaBackend {
            ctx: Arc::clone(&ctx),
            zero: None,
            fence_stream: None,
            calls: CallCounters::default(),
            ordinal: device,
            name,
            total_memory,
            granularity,
            streams: Vec::with_capacity(COPY_STREAMS),
            next_stream: AtomicUsize::new(0),
            reservations: Mutex::new(BTreeMap::new()),
            mapped: Mutex::new(BTreeMap::new()),
        };
        for _ in 0..COPY_STREAMS {
            // On error, `backend` is dropped, which destroys the streams made so far.
            let s = result::stream::create(CU_STREAM_NON_BLOCKING)?;
            backend.streams.push(Stream(s));
        }
        backend.fence_stream = Some(Stream(result::stream::create(CU_STREAM_NON_BLOCKING)?));
        if zero_page {
            backend.zero = Some(backend.make_zero_page()?);
        }
        drop(bound);
        Ok(backend)
    }

    /// Creates one page of zeros (mapped once, read/write, to be cleared).
    fn make_zero_page(&self) -> Result<u64> {
        let g = self.granularity;
        let prop = CUmemAllocationProp::pinned_device(self.ctx.device());
        let handle =
            result::mem::create(g, &prop, 0).map_err(|e| driver_error(BackendOp::CreatePage, e))?;
        let cleared = (|| -> std::result::Result<(), DriverError> {
            let va = result::mem::address_reserve(g, g, 0, 0)?;
            let zeros = vec![0u8; g];
            // SAFETY: `va` is a fresh reservation of one granule, `handle` a fresh page of that
            // size; the page is mapped, written through a synchronous copy from `zeros` (alive
            // for the call) and unmapped before the reservation is freed.
            let r = unsafe {
                result::mem::map(va, g, 0, handle, 0).and_then(|()| {
                    let access = [CUmemAccessDesc::read_write_device(self.ctx.device())];
                    let r = result::mem::set_access(va, g, &access)
                        .and_then(|()| result::mem::memcpy_htod(va, zeros.as_ptr().cast(), g));
                    let u = result::mem::unmap(va, g);
                    r.and(u)
                })
            };
            // SAFETY: the reservation is whole and nothing is mapped in it any more.
            let f = unsafe { result::mem::address_free(va, g) };
            r.and(f)
        })();
        if let Err(e) = cleared {
            // SAFETY: the page was created above and is mapped nowhere.
            let _ = unsafe { result::mem::release(handle) };
            return Err(driver_error(BackendOp::CreatePage, e));
        }
        Ok(handle)
    }

    /// The driver calls made for mappings so far.
    pub fn driver_calls(&self) -> DriverCalls {
        DriverCalls {
            mem_map: self.calls.mem_map.load(Ordering::Relaxed),
            mem_unmap: self.calls.mem_unmap.load(Ordering::Relaxed),
            mem_set_access: self.calls.mem_set_access.load(Ordering::Relaxed),
        }
    }

    /// Whether unmapped ranges read as zeros.
    pub fn zero_page(&self) -> bool {
        self.zero.is_some()
    }

    /// Maps the zero page read-only at every granule of `[va, va+len)` (which is unmapped).
    /// On error nothing of the range is mapped. The context must be current.
    fn map_zeros(&self, zero: u64, va: u64, len: usize) -> std::result::Result<(), DriverError> {
        let g = self.granularity;
        let mut off = 0;
        while off < len {
            self.calls.mem_map.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `[va+off, +g)` lies in a reservation of this backend and is unmapped (the
            // callers' contract); the zero page is live for the backend's life and `g` bytes.
            if let Err(e) = unsafe { result::mem::map(va + off as u64, g, 0, zero, 0) } {
                self.rollback_map(va, off);
                return Err(e);
            }
            off += g;
        }
        let access = [CUmemAccessDesc {
            location: kvvm_sys::CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ctx.device(),
            },
            flags: CU_MEM_ACCESS_FLAGS_PROT_READ,
        }];
        self.calls.mem_set_access.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `[va, va+len)` consists of the zero-page mappings made just above.
        if let Err(e) = unsafe { result::mem::set_access(va, len, &access) } {
            self.rollback_map(va, len);
            return Err(e);
        }
        Ok(())
    }

    /// The device ordinal.
    pub fn device(&self) -> i32 {
        self.ordinal
    }

    fn mapped(&self) -> MutexGuard<'_, BTreeMap<u64, usize>> {
        // Consistent after every statement, so a poisoned lock is still usable.
        self.mapped
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reservations(&self) -> MutexGuard<'_, BTreeMap<u64, usize>> {
        // The map is consistent after every statement, so a poisoned lock is still usable.
        self.reservations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks that `[va, va+len)` is granularity-aligned and inside one live reservation.
    fn check_range(&self, what: &str, va: u64, len: usize) -> Result<()> {
        check_multiple(what, len, self.granularity)?;
        if va % self.granularity as u64 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{what} address {va:#x} is not aligned to the granularity {}",
                self.granularity
            )));
        }
        let reservations = self.reservations();
        let inside = reservations
            .range(..=va)
            .next_back()
            .is_some_and(|(&addr, &rlen)| VaRange { addr, len: rlen }.contains(va, len));
        if inside {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{what} range [{va:#x}, +{len:#x}) is not inside a reservation of this backend"
            )))
        }
    }

    /// Best-effort unmapping of a run this backend just mapped (rollback of a failed `map`).
    fn rollback_map(&self, va: u64, len: usize) {
        if len == 0 {
            return;
        }
        self.calls.mem_unmap.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `[va, va+len)` consists of whole mappings made by the failing `map` call, which
        // has not returned them to anyone.
        if let Err(e) = unsafe { result::mem::unmap(va, len) } {
            tracing::error!("rolling back a failed map: cuMemUnmap({va:#x}, {len}) failed: {e}");
        }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let bound = self.ctx.bind();
        for s in self.streams.drain(..) {
            // SAFETY: the stream was created by this backend and is destroyed once; work still
            // queued on it completes before the driver releases it.
            let _ = unsafe { result::stream::destroy(s.0) };
        }
        if let Some(s) = self.fence_stream.take() {
            // SAFETY: as above.
            let _ = unsafe { result::stream::destroy(s.0) };
        }
        if let Some(z) = self.zero.take() {
            // SAFETY: the zero page was created by this backend and is released once; the driver
            // defers the release while reservations still map it.
            let _ = unsafe { result::mem::release(z) };
        }
        let left = self.reservations().len();
        if left > 0 {
            tracing::warn!(
                "CUDA backend for device {} dropped with {left} reservation(s) still held; \
                 leaking them",
                self.ordinal
            );
        }
        drop(bound);
        // `self.ctx` drops after this, releasing the primary context once no completion holds it.
    }
}

/// The `cuMemSetAccess` grant of `access` for device `ordinal`.
fn access_desc(access: Access, ordinal: kvvm_sys::CUdevice) -> CUmemAccessDesc {
    match access {
        Access::ReadWrite => CUmemAccessDesc::read_write_device(ordinal),
        Access::ReadOnly => CUmemAccessDesc::read_only_device(ordinal),
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Cuda,
            device_name: self.name.clone(),
            device_ordinal: self.ordinal,
            granularity: self.granularity,
            total_memory: self.total_memory,
            max_map_count: None,
            map_headroom: None,
            usable_memory: None,
        }
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn granularity(&self) -> usize {
        self.granularity
    }

    fn reserve(&self, len: usize) -> Result<VaRange> {
        check_multiple("reservation", len, self.granularity)?;
        let _bound = bind_for(&self.ctx, BackendOp::Reserve)?;
        let addr = result::mem::address_reserve(len, self.granularity, 0, 0)
            .map_err(|e| driver_error(BackendOp::Reserve, e))?;
        if let Some(zero) = self.zero {
            if let Err(e) = self.map_zeros(zero, addr, len) {
                // SAFETY: the reservation was made above and nothing is mapped in it.
                let _ = unsafe { result::mem::address_free(addr, len) };
                return Err(driver_error(BackendOp::Reserve, e));
            }
        }
        self.reservations().insert(addr, len);
        Ok(VaRange { addr, len })
    }

    fn free_reservation(&self, range: VaRange) -> Result<()> {
        // Removing first keeps a concurrent second free of the same range from reaching the
        // driver; the entry is put back if the driver refuses.
        let removed = self.reservations().remove(&range.addr);
        match removed {
            Some(len) if len == range.len => {}
            Some(len) => {
                self.reservations().insert(range.addr, len);
                return Err(Error::InvalidArgument(format!(
                    "reservation at {:#x} has {len} bytes, not {}",
                    range.addr, range.len
                )));
            }
            None => {
                return Err(Error::InvalidArgument(format!(
                    "no reservation of this backend starts at {:#x}",
                    range.addr
                )))
            }
        }
        let outcome = bind_for(&self.ctx, BackendOp::FreeReservation).and_then(|_bound| {
            if self.zero.is_some() {
                self.calls.mem_unmap.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the trait contract makes the caller unmap its pages first, so the
                // range holds only zero-page mappings made by this backend.
                unsafe { result::mem::unmap(range.addr, range.len) }
                    .map_err(|e| driver_error(BackendOp::FreeReservation, e))?;
            }
            // SAFETY: the range is a whole reservation made by this backend (checked above);
            // nothing is mapped in it any more.
            let r = unsafe { result::mem::address_free(range.addr, range.len) }
                .map_err(|e| driver_error(BackendOp::FreeReservation, e));
            if r.is_err() {
                if let Some(zero) = self.zero {
                    let _ = self.map_zeros(zero, range.addr, range.len);
                }
            }
            r
        });
        if outcome.is_err() {
            self.reservations().insert(range.addr, range.len);
        }
        outcome
    }

    fn detach(
        &self,
        ranges: Vec<VaRange>,
        pages: Vec<PageHandle>,
    ) -> std::result::Result<Box<dyn Detached>, DetachRefused> {
        let mut res = self.reservations();
        if !ranges.iter().all(|r| res.get(&r.addr) == Some(&r.len)) {
            return Err((ranges, pages));
        }
        let Ok(bound) = self.ctx.bind() else {
            return Err((ranges, pages));
        };
        for r in &ranges {
            res.remove(&r.addr);
        }
        drop(res);
        // What the owner unmaps: with the zero page every range is mapped end to end (pages and
        // zero granules); without it, the runs of mapped pages (the driver refuses to unmap
        // address space that holds no mapping).
        let mut unmaps: Vec<(u64, usize)> = Vec::new();
        let mut mapped = self.mapped();
        for r in &ranges {
            let inside: Vec<(u64, usize)> = mapped
                .range(r.addr..r.end())
                .map(|(&a, &l)| (a, l))
                .collect();
            for &(a, l) in &inside {
                mapped.remove(&a);
                match unmaps.last_mut() {
                    Some((at, len)) if *at + *len as u64 == a => *len += l,
                    _ => unmaps.push((a, l)),
                }
            }
        }
        drop(mapped);
        if self.zero.is_some() {
            unmaps = ranges.iter().map(|r| (r.addr, r.len)).collect();
        }
        for p in pages {
            // SAFETY: `p` is the unique owner of a page handle of this backend (the trait's
            // contract); releasing a mapped handle is allowed: the driver frees the memory when
            // its last mapping goes, which the detached owner's unmap does.
            if let Err(e) = unsafe { result::mem::release(p.raw()) } {
                tracing::warn!("releasing a detached page handle: {e}");
            }
        }
        drop(bound);
        Ok(Box::new(CudaDetached {
            ctx: self.ctx.clone(),
            unmaps,
            ranges,
        }))
    }

    fn create_page(&self, size: usize) -> Result<PageHandle> {
        check_multiple("page", size, self.granularity)?;
        let _bound = bind_for(&self.ctx, BackendOp::CreatePage)?;
        let prop = CUmemAllocationProp::pinned_device(self.ctx.device());
        let handle = result::mem::create(size, &prop, 0)
            .map_err(|e| driver_error(BackendOp::CreatePage, e))?;
        Ok(PageHandle::from_raw(handle, size))
    }

    fn release_page(&self, page: PageHandle) -> std::result::Result<(), (PageHandle, Error)> {
        let bound = match bind_for(&self.ctx, BackendOp::ReleasePage) {
            Ok(b) => b,
            Err(e) => return Err((page, e)),
        };
        // SAFETY: `PageHandle` is neither Copy nor Clone and only this backend creates CUDA page
        // handles, so `page` is the unique owner of this allocation handle and it is released once.
        let outcome = unsafe { result::mem::release(page.raw()) };
        drop(bound);
        outcome.map_err(|e| (page, driver_error(BackendOp::ReleasePage, e)))
    }

    fn map(&self, va: u64, pages: &[&PageHandle]) -> Result<()> {
        self.map_with_access(va, pages, Access::ReadWrite)
    }

    fn map_with_access(&self, va: u64, pages: &[&PageHandle], access: Access) -> Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let mut total: usize = 0;
        for p in pages {
            check_multiple("page", p.size(), self.granularity)?;
            total = total.checked_add(p.size()).ok_or_else(|| {
                Error::InvalidArgument("total size of the pages to map overflows".into())
            })?;
        }
        self.check_range("mapping", va, total)?;
        // With the zero page, mapping first unmaps the range: a range holding real pages must be
        // refused before that (without it, the driver refuses to map over a mapping).
        if self.zero.is_some() {
            let mapped = self.mapped();
            let end = va + total as u64;
            if let Some((&at, &len)) = mapped.range(..end).next_back() {
                if at + len as u64 > va {
                    return Err(Error::InvalidArgument(format!(
                        "mapping [{va:#x}, +{total:#x}): the page at {at:#x} is already mapped"
                    )));
                }
            }
        }
        let _bound = bind_for(&self.ctx, BackendOp::Map)?;
        // Puts the zero page back behind the range after a failure (best effort).
        let restore_zeros = || {
            if let Some(zero) = self.zero {
                if let Err(e) = self.map_zeros(zero, va, total) {
                    tracing::error!("mapping the zero page back at {va:#x} failed: {e}");
                }
            }
        };
        if self.zero.is_some() {
            self.calls.mem_unmap.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the range lies in a reservation of this backend and is unmapped by the
            // trait's contract, so it holds only the zero page's read-only mappings.
            unsafe { result::mem::unmap(va, total) }
                .map_err(|e| driver_error(BackendOp::Map, e))?;
        }
        let mut offset: usize = 0;
        for p in pages {
            let at = va + offset as u64;
            self.calls.mem_map.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `[at, at+size)` lies inside a reservation of this backend (checked above)
            // and is unmapped (by the trait's contract, and the zero page was unmapped above);
            // the driver validates the handle, so a foreign or released handle gives an error
            // (or maps meaningless bytes), and the offset 0 + size is within a page of `size`
            // bytes.
            if let Err(e) = unsafe { result::mem::map(at, p.size(), 0, p.raw(), 0) } {
                self.rollback_map(va, offset);
                restore_zeros();
                return Err(driver_error(BackendOp::Map, e));
            }
            offset += p.size();
        }
        let access = [access_desc(access, self.ctx.device())];
        self.calls.mem_set_access.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `[va, va+total)` was mapped by this call just above and is not yet in use.
        if let Err(e) = unsafe { result::mem::set_access(va, total, &access) } {
            self.rollback_map(va, total);
            restore_zeros();
            return Err(driver_error(BackendOp::Map, e));
        }
        let mut mapped = self.mapped();
        let mut at = va;
        for p in pages {
            mapped.insert(at, p.size());
            at += p.size() as u64;
        }
        Ok(())
    }

    fn protect(&self, va: u64, len: usize, access: Access) -> Result<()> {
        self.check_range("protecting", va, len)?;
        let _bound = bind_for(&self.ctx, BackendOp::Protect)?;
        let desc = [access_desc(access, self.ctx.device())];
        // SAFETY: the range lies in a reservation of this backend and, by the trait's contract,
        // consists of whole pages mapped by `map`; changing their access rights touches no memory.
        unsafe { result::mem::set_access(va, len, &desc) }
            .map_err(|e| driver_error(BackendOp::Protect, e))
    }

    fn unmap(&self, va: u64, len: usize) -> Result<()> {
        self.check_range("unmapping", va, len)?;
        let _bound = bind_for(&self.ctx, BackendOp::Unmap)?;
        self.calls.mem_unmap.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the range lies in a reservation of this backend; the trait's contract makes it
        // whole mappings made by `map` that no kernel or copy still uses.
        unsafe { result::mem::unmap(va, len) }.map_err(|e| driver_error(BackendOp::Unmap, e))?;
        {
            let mut mapped = self.mapped();
            let gone: Vec<u64> = mapped
                .range(va..va + len as u64)
                .map(|(&at, _)| at)
                .collect();
            for at in gone {
                mapped.remove(&at);
            }
        }
        if let Some(zero) = self.zero {
            // The pages are gone either way; without the zero page the range faults on access
            // instead of reading zeros, which is logged, not an error of this call.
            if let Err(e) = self.map_zeros(zero, va, len) {
                tracing::error!("mapping the zero page at {va:#x} (+{len:#x}) failed: {e}");
            }
        }
        Ok(())
    }

    fn alloc_host(&self, len: usize) -> Result<HostBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "a host buffer of 0 bytes cannot be allocated".into(),
            ));
        }
        let _bound = bind_for(&self.ctx, BackendOp::AllocHost)?;
        let p = result::mem::host_alloc(len, CU_MEMHOSTALLOC_PORTABLE)
            .map_err(|e| driver_error(BackendOp::AllocHost, e))?;
        Ok(HostBuffer::from_raw(p.expose_provenance() as u64, len))
    }

    fn free_host(&self, buf: HostBuffer) -> std::result::Result<(), (HostBuffer, Error)> {
        let bound = match bind_for(&self.ctx, BackendOp::FreeHost) {
            Ok(b) => b,
            Err(e) => return Err((buf, e)),
        };
        let p = std::ptr::with_exposed_provenance_mut::<c_void>(buf.addr() as usize);
        // SAFETY: `HostBuffer` is neither Copy nor Clone and CUDA host buffers come only from
        // `alloc_host`, so `buf` uniquely owns this pinned allocation; the trait's contract says no
        // copy is in flight on it.
        let outcome = unsafe { result::mem::free_host(p) };
        drop(bound);
        outcome.map_err(|e| (buf, driver_error(BackendOp::FreeHost, e)))
    }

    unsafe fn copy_async(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
    ) -> Result<Box<dyn Completion>> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.submit_copies(kind, regions, None) }
    }

    unsafe fn copy_async_after(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
        after: Option<&dyn Fence>,
    ) -> Result<Box<dyn Completion>> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.submit_copies(kind, regions, after) }
    }

    fn synchronize(&self) -> Result<()> {
        let _bound = bind_for(&self.ctx, BackendOp::Synchronize)?;
        result::ctx::synchronize().map_err(|e| driver_error(BackendOp::Synchronize, e))
    }

    fn record_fence(&self, stream: u64) -> Result<Option<Arc<dyn Fence>>> {
        let _bound = bind_for(&self.ctx, BackendOp::Copy)?;
        let stream: CUstream = std::ptr::with_exposed_provenance_mut(stream as usize);
        Ok(Some(self.new_fence(|event| {
            // SAFETY: `event` was just created in this context; the caller names a live stream
            // (a destroyed one gives the driver's error for handles the driver still tracks).
            unsafe { result::event::record(event, stream) }
        })?))
    }

    fn fence_after_event(&self, event: u64) -> Result<Option<Arc<dyn Fence>>> {
        let _bound = bind_for(&self.ctx, BackendOp::Copy)?;
        let Some(fs) = self.fence_stream.as_ref().map(|s| s.0) else {
            return Err(Error::Unsupported(
                "the CUDA backend has no fence stream".into(),
            ));
        };
        let theirs: CUevent = std::ptr::with_exposed_provenance_mut(event as usize);
        Ok(Some(self.new_fence(|ours| {
            // SAFETY: `fs` is this backend's stream; the caller names a live event. The fence
            // stream waits for the caller's event as recorded now, then records ours.
            unsafe {
                result::stream::wait_event(fs, theirs, 0)?;
                result::event::record(ours, fs)
            }
        })?))
    }

    fn stream_wait_event(&self, stream: u64, event: u64) -> Result<()> {
        let _bound = bind_for(&self.ctx, BackendOp::Copy)?;
        let stream: CUstream = std::ptr::with_exposed_provenance_mut(stream as usize);
        let event: CUevent = std::ptr::with_exposed_provenance_mut(event as usize);
        // SAFETY: the caller names a live stream, and `event` is one of this backend's events
        // (a ticket's or a fence's, alive while the caller holds it).
        unsafe { result::stream::wait_event(stream, event, 0) }
            .map_err(|e| driver_error(BackendOp::Copy, e))
    }

    fn prepare_thread(&self) {
        if let Err(e) = self.ctx.make_current() {
            tracing::warn!("binding the CUDA context on a kvvm thread failed: {e}");
        }
        match kvvm_sys::driver() {
            Ok(d) => {
                let mut mode = CU_STREAM_CAPTURE_MODE_RELAXED;
                // SAFETY: `mode` is a valid in/out pointer for the call.
                let rc = unsafe { (d.cuThreadExchangeStreamCaptureMode)(&mut mode) };
                if rc != 0 {
                    tracing::warn!("cuThreadExchangeStreamCaptureMode(RELAXED) returned {rc}");
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

impl CudaBackend {
    /// Creates an event, lets `record` record it, and wraps it in a fence.
    fn new_fence(
        &self,
        record: impl FnOnce(CUevent) -> std::result::Result<(), DriverError>,
    ) -> Result<Arc<dyn Fence>> {
        let event = result::event::create(CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC)
            .map_err(|e| driver_error(BackendOp::Copy, e))?;
        if let Err(e) = record(event) {
            // SAFETY: the event was created above, never recorded, and is not used again.
            let _ = unsafe { result::event::destroy(event) };
            return Err(driver_error(BackendOp::Copy, e));
        }
        Ok(Arc::new(CudaCompletion {
            event,
            ctx: Arc::clone(&self.ctx),
        }))
    }

    /// Submits `regions` on one copy stream, after `after` if given (the stream waits on its
    /// event), then records the completion's event.
    ///
    /// # Safety
    /// As [`Backend::copy_async`].
    unsafe fn submit_copies(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
        after: Option<&dyn Fence>,
    ) -> Result<Box<dyn Completion>> {
        let op = BackendOp::Copy;
        let _bound = bind_for(&self.ctx, op)?;
        let i = self.next_stream.fetch_add(1, Ordering::Relaxed) % self.streams.len().max(1);
        let Some(stream) = self.streams.get(i).map(|s| s.0) else {
            return Err(Error::Unsupported(
                "the CUDA backend has no copy streams".into(),
            ));
        };
        let submit = || -> std::result::Result<CUevent, DriverError> {
            if let Some(f) = after {
                let event: CUevent = std::ptr::with_exposed_provenance_mut(f.event() as usize);
                // SAFETY: `stream` is ours; the fence keeps its event alive for this call.
                unsafe { result::stream::wait_event(stream, event, 0)? };
            }
            for r in regions.iter().filter(|r| r.len > 0) {
                match kind {
                    CopyKind::HostToDevice => {
                        let src = std::ptr::with_exposed_provenance::<c_void>(r.src as usize);
                        // SAFETY: the caller guarantees (copy_async's contract) that `src` is
                        // readable host memory and `dst` mapped, writable device memory for `len`
                        // bytes until the completion reports done; `stream` is ours and live.
                        unsafe { result::mem::memcpy_htod_async(r.dst, src, r.len, stream)? }
                    }
                    CopyKind::DeviceToHost => {
                        let dst = std::ptr::with_exposed_provenance_mut::<c_void>(r.dst as usize);
                        // SAFETY: as above, with `dst` writable host memory and `src` mapped,
                        // readable device memory.
                        unsafe { result::mem::memcpy_dtoh_async(dst, r.src, r.len, stream)? }
                    }
                    CopyKind::DeviceToDevice => {
                        // SAFETY: as above, both ranges mapped device memory.
                        unsafe { result::mem::memcpy_dtod_async(r.dst, r.src, r.len, stream)? }
                    }
                }
            }
            // Blocking sync: `Completion::wait` sleeps instead of spinning a core.
            let event = result::event::create(CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC)?;
            // SAFETY: `event` was just created in this context and `stream` is ours.
            if let Err(e) = unsafe { result::event::record(event, stream) } {
                // SAFETY: the event was created above, never recorded, and is not used again.
                let _ = unsafe { result::event::destroy(event) };
                return Err(e);
            }
            Ok(event)
        };
        match submit() {
            Ok(event) => Ok(Box::new(CudaCompletion {
                event,
                ctx: Arc::clone(&self.ctx),
            })),
            Err(e) => {
                // Copies enqueued before the failure still read and write the caller's memory;
                // wait for them so that nothing is in flight once the error is returned.
                // SAFETY: `stream` is ours and live.
                if let Err(sync) = unsafe { result::stream::synchronize(stream) } {
                    tracing::error!("synchronizing after a failed copy submission: {sync}");
                }
                Err(driver_error(op, e))
            }
        }
    }
}

/// Completion of a [`CudaBackend::copy_async`]: an event recorded after the copies.
#[derive(Debug)]
struct CudaCompletion {
    event: CUevent,
    /// Keeps the context (and so the event) alive even if the backend is dropped first.
    ctx: Arc<PrimaryContext>,
}

// SAFETY: a CUevent is a driver handle usable from any thread; querying and synchronizing one
// event from several threads at once is allowed by the driver.
unsafe impl Send for CudaCompletion {}
// SAFETY: as above; the completion has no interior mutability of its own.
unsafe impl Sync for CudaCompletion {}

impl Completion for CudaCompletion {
    fn poll(&self) -> Result<bool> {
        let _bound = bind_for(&self.ctx, BackendOp::Copy)?;
        // SAFETY: the event is live until this completion is dropped.
        unsafe { result::event::query(self.event) }.map_err(|e| driver_error(BackendOp::Copy, e))
    }

    fn wait(&self) -> Result<()> {
        let _bound = bind_for(&self.ctx, BackendOp::Copy)?;
        // SAFETY: the event is live until this completion is dropped.
        unsafe { result::event::synchronize(self.event) }
            .map_err(|e| driver_error(BackendOp::Copy, e))
    }

    fn event(&self) -> Option<u64> {
        Some(self.event.expose_provenance() as u64)
    }
}

impl Fence for CudaCompletion {
    fn poll(&self) -> Result<bool> {
        Completion::poll(self)
    }
    fn wait(&self) -> Result<()> {
        Completion::wait(self)
    }
    fn event(&self) -> u64 {
        self.event.expose_provenance() as u64
    }
}

impl Drop for CudaCompletion {
    fn drop(&mut self) {
        let bound = self.ctx.bind();
        // SAFETY: the event was created for this completion and is destroyed once, here; the
        // driver defers the release if the recorded work is still pending.
        let _ = unsafe { result::event::destroy(self.event) };
        drop(bound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_call_errors_become_backend_errors() {
        let e = driver_error(
            BackendOp::CreatePage,
            DriverError::Call {
                code: kvvm_sys::CUDA_ERROR_OUT_OF_MEMORY,
                name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
                description: "out of memory".into(),
                function: "cuMemCreate",
            },
        );
        match &e {
            Error::Backend {
                backend,
                op,
                code,
                message,
            } => {
                assert_eq!(*backend, BackendKind::Cuda);
                assert_eq!(*op, BackendOp::CreatePage);
                assert_eq!(*code, 2);
                assert!(message.contains("cuMemCreate"), "{message}");
                assert!(message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.is_exhaustion());
    }

    #[test]
    fn loading_errors_stay_driver_errors() {
        let e = driver_error(
            BackendOp::Reserve,
            DriverError::LibraryNotFound {
                library: "CUDA driver",
                tried: vec!["libcuda.so.1".into()],
                message: "not found".into(),
            },
        );
        assert!(matches!(e, Error::Driver(_)), "{e:?}");
        assert!(!e.is_exhaustion());
    }

    /// Without the NVIDIA driver (CI, this machine) the constructor is an error naming libcuda.
    #[test]
    fn new_without_a_driver_is_an_error() {
        if kvvm_sys::driver().is_ok() {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let e = CudaBackend::new(0).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("libcuda"), "{s}");
        assert!(matches!(e, Error::Driver(_)), "{e:?}");
    }
}

/// Tests for a machine with a CUDA GPU: `cargo test --lib vmm::cuda -- --ignored`.
#[cfg(test)]
mod gpu_tests {
    use super::*;

    fn backend() -> CudaBackend {
        CudaBackend::new(0).expect("a CUDA device with virtual memory management")
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn info_and_bad_device() {
        let b = backend();
        let info = b.info();
        assert_eq!(info.kind, BackendKind::Cuda);
        assert!(!info.device_name.is_empty());
        assert!(info.granularity.is_power_of_two() && info.granularity >= 4096);
        assert!(info.total_memory > 0);
        assert_eq!(info.max_map_count, None);
        assert!(matches!(
            CudaBackend::new(1 << 20),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn map_write_read_through_an_alias() {
        let b = backend();
        let g = b.granularity();
        let r1 = b.reserve(2 * g).unwrap();
        let r2 = b.reserve(g).unwrap();
        let p1 = b.create_page(g).unwrap();
        let p2 = b.create_page(g).unwrap();
        b.map(r1.addr, &[&p1, &p2]).unwrap();
        // The first page again, at another address.
        b.map(r2.addr, &[&p1]).unwrap();

        let src: Vec<u8> = (0..2 * g).map(|i| (i % 251) as u8).collect();
        let mut alias = vec![0u8; g];
        let mut second = vec![0u8; g];
        {
            let _bound = b.ctx.bind().unwrap();
            // SAFETY: both ranges are mapped read/write by this test; the host buffers are
            // valid for the lengths given.
            unsafe {
                result::mem::memcpy_htod(r1.addr, src.as_ptr().cast(), 2 * g).unwrap();
                result::mem::memcpy_dtoh(alias.as_mut_ptr().cast(), r2.addr, g).unwrap();
                result::mem::memcpy_dtoh(second.as_mut_ptr().cast(), r1.addr + g as u64, g)
                    .unwrap();
            }
        }
        assert!(alias[..] == src[..g], "alias mapping shows different bytes");
        assert!(second[..] == src[g..], "second page differs");

        // Misuse is an error value.
        assert!(matches!(
            b.map(r1.addr + 1, &[&p1]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            b.map(r1.end(), &[&p1]),
            Err(Error::InvalidArgument(_))
        ));
        // Mapping over an existing mapping fails and leaves the range as it was.
        assert!(b.map(r1.addr, &[&p2]).is_err());

        b.unmap(r2.addr, g).unwrap();
        // The two pages of one `map` call, unmapped in two parts.
        b.unmap(r1.addr + g as u64, g).unwrap();
        b.unmap(r1.addr, g).unwrap();
        // Unmapping keeps the contents: map again and read.
        b.map(r2.addr, &[&p2]).unwrap();
        {
            let _bound = b.ctx.bind().unwrap();
            // SAFETY: r2 is mapped read/write again; `second` is valid for `g` bytes.
            unsafe { result::mem::memcpy_dtoh(second.as_mut_ptr().cast(), r2.addr, g).unwrap() };
        }
        assert!(second[..] == src[g..], "page contents lost across unmap");
        b.unmap(r2.addr, g).unwrap();

        b.release_page(p1).map_err(|(_, e)| e).unwrap();
        b.release_page(p2).map_err(|(_, e)| e).unwrap();
        b.free_reservation(r1).unwrap();
        b.free_reservation(r2).unwrap();
        assert!(matches!(
            b.free_reservation(r2),
            Err(Error::InvalidArgument(_))
        ));
        b.synchronize().unwrap();
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn copy_async_round_trip() {
        let b = backend();
        let g = b.granularity();
        let len = 2 * g;
        let r = b.reserve(len).unwrap();
        let pages = [b.create_page(g).unwrap(), b.create_page(g).unwrap()];
        b.map(r.addr, &[&pages[0], &pages[1]]).unwrap();
        let a = b.alloc_host(len).unwrap();
        let c = b.alloc_host(len).unwrap();
        // SAFETY: `a` and `c` are pinned buffers of `len` bytes owned by this test.
        let (ha, hc) = unsafe {
            (
                std::slice::from_raw_parts_mut(
                    std::ptr::with_exposed_provenance_mut(a.addr() as usize),
                    len,
                ),
                std::slice::from_raw_parts_mut(
                    std::ptr::with_exposed_provenance_mut(c.addr() as usize),
                    len,
                ),
            )
        };
        for (i, x) in ha.iter_mut().enumerate() {
            *x = (i * 13 % 256) as u8;
        }
        hc.fill(0);
        // Chunked regions, as the swap engine issues them.
        let chunk = g / 2;
        let up: Vec<CopyRegion> = (0..len / chunk)
            .map(|k| CopyRegion {
                dst: r.addr + (k * chunk) as u64,
                src: a.addr() + (k * chunk) as u64,
                len: chunk,
            })
            .collect();
        // SAFETY: every range is mapped/allocated above and untouched until the waits below.
        let done = unsafe { b.copy_async(CopyKind::HostToDevice, &up) }.unwrap();
        assert!(done.event().is_some());
        done.wait().unwrap();
        assert!(done.poll().unwrap());
        let down = [CopyRegion {
            dst: c.addr(),
            src: r.addr,
            len,
        }];
        // SAFETY: as above.
        let done2 = unsafe { b.copy_async(CopyKind::DeviceToHost, &down) }.unwrap();
        while !done2.poll().unwrap() {
            std::thread::yield_now();
        }
        assert!(ha == hc, "round trip changed the bytes");
        drop(done);
        drop(done2);

        b.unmap(r.addr, len).unwrap();
        for p in pages {
            b.release_page(p).map_err(|(_, e)| e).unwrap();
        }
        b.free_reservation(r).unwrap();
        b.free_host(a).map_err(|(_, e)| e).unwrap();
        b.free_host(c).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn completion_outlives_the_backend() {
        let b = backend();
        // SAFETY: no regions, so no memory is touched.
        let done = unsafe { b.copy_async(CopyKind::HostToDevice, &[]) }.unwrap();
        drop(b);
        done.wait().unwrap();
        assert!(done.poll().unwrap());
    }
}
