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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvvm_sys::result;
use kvvm_sys::{Bound, PrimaryContext};
use kvvm_sys::{
    CUevent, CUmemAccessDesc, CUmemAllocationProp, CUstream, DriverError,
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, CU_EVENT_BLOCKING_SYNC,
    CU_EVENT_DISABLE_TIMING, CU_MEMHOSTALLOC_PORTABLE, CU_MEM_ALLOC_GRANULARITY_MINIMUM,
    CU_STREAM_NON_BLOCKING,
};

use super::{
    check_multiple, Access, Backend, BackendInfo, BackendKind, BackendOp, Completion, CopyKind,
    CopyRegion, HostBuffer, PageHandle, VaRange,
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

/// A stream owned by the backend.
#[derive(Debug)]
struct Stream(CUstream);

// SAFETY: a CUstream is a driver handle usable from any thread; the driver serialises
// submissions to one stream internally.
unsafe impl Send for Stream {}
// SAFETY: as above; submitting to a stream from several threads at once is allowed.
unsafe impl Sync for Stream {}

/// The CUDA virtual-memory backend for one device. See the [module documentation](self).
#[derive(Debug)]
pub struct CudaBackend {
    ctx: Arc<PrimaryContext>,
    ordinal: i32,
    name: String,
    total_memory: u64,
    granularity: usize,
    streams: Vec<Stream>,
    next_stream: AtomicUsize,
    /// Live reservations: start address → length.
    reservations: Mutex<BTreeMap<u64, usize>>,
}

impl CudaBackend {
    /// Opens device `device` (an ordinal as seen through `CUDA_VISIBLE_DEVICES`).
    ///
    /// # Errors
    /// [`Error::Driver`] when the driver cannot be loaded or initialised (e.g. no NVIDIA driver
    /// on this machine: the message names `libcuda.so.1`); [`Error::InvalidConfig`] when the
    /// device does not exist; [`Error::Unsupported`] when it lacks virtual memory management.
    pub fn new(device: i32) -> Result<Self> {
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
            ordinal: device,
            name,
            total_memory,
            granularity,
            streams: Vec::with_capacity(COPY_STREAMS),
            next_stream: AtomicUsize::new(0),
            reservations: Mutex::new(BTreeMap::new()),
        };
        for _ in 0..COPY_STREAMS {
            // On error, `backend` is dropped, which destroys the streams made so far.
            let s = result::stream::create(CU_STREAM_NON_BLOCKING)?;
            backend.streams.push(Stream(s));
        }
        drop(bound);
        Ok(backend)
    }

    /// The device ordinal.
    pub fn device(&self) -> i32 {
        self.ordinal
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
            // SAFETY: the range is a whole reservation made by this backend (checked above);
            // the trait contract makes the caller unmap everything in it first.
            unsafe { result::mem::address_free(range.addr, range.len) }
                .map_err(|e| driver_error(BackendOp::FreeReservation, e))
        });
        if outcome.is_err() {
            self.reservations().insert(range.addr, range.len);
        }
        outcome
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
        let _bound = bind_for(&self.ctx, BackendOp::Map)?;
        let mut offset: usize = 0;
        for p in pages {
            let at = va + offset as u64;
            // SAFETY: `[at, at+size)` lies inside a reservation of this backend (checked above)
            // and is unmapped by the trait's contract; the driver validates the handle, so a
            // foreign or released handle gives an error (or maps meaningless bytes), and the
            // offset 0 + size is within a page of `size` bytes.
            if let Err(e) = unsafe { result::mem::map(at, p.size(), 0, p.raw(), 0) } {
                self.rollback_map(va, offset);
                return Err(driver_error(BackendOp::Map, e));
            }
            offset += p.size();
        }
        let access = [access_desc(access, self.ctx.device())];
        // SAFETY: `[va, va+total)` was mapped by this call just above and is not yet in use.
        if let Err(e) = unsafe { result::mem::set_access(va, total, &access) } {
            self.rollback_map(va, total);
            return Err(driver_error(BackendOp::Map, e));
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
        // SAFETY: the range lies in a reservation of this backend; the trait's contract makes it
        // whole mappings made by `map` that no kernel or copy still uses.
        unsafe { result::mem::unmap(va, len) }.map_err(|e| driver_error(BackendOp::Unmap, e))
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
        let op = BackendOp::Copy;
        let _bound = bind_for(&self.ctx, op)?;
        let i = self.next_stream.fetch_add(1, Ordering::Relaxed) % self.streams.len().max(1);
        let Some(stream) = self.streams.get(i).map(|s| s.0) else {
            return Err(Error::Unsupported(
                "the CUDA backend has no copy streams".into(),
            ));
        };
        let submit = || -> std::result::Result<CUevent, DriverError> {
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

    fn synchronize(&self) -> Result<()> {
        let _bound = bind_for(&self.ctx, BackendOp::Synchronize)?;
        result::ctx::synchronize().map_err(|e| driver_error(BackendOp::Synchronize, e))
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
