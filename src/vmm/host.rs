//! The host backend: Linux memfd "physical pages" mapped with `mmap(MAP_FIXED)` into anonymous
//! reservations (read-only zeros, or `PROT_NONE`).
//!
//! - A page is an extent of one memfd arena. Creating it allocates its memory with `fallocate`
//!   (like `cuMemCreate`, it is committed, not lazily faulted); releasing it punches a hole, which
//!   gives the memory back to the system.
//! - Mapping a run of pages whose arena offsets are consecutive takes one `mmap` call.
//! - Unmapping maps fresh anonymous memory over the range, which the kernel merges back into the
//!   reservation. With [`HostConfig::zero_page`] (the default) reservations and unmapped ranges
//!   are readable, private anonymous memory that is never written: reads return zeros (the
//!   kernel's shared zero page, no memory used) and writes fault; without it they are
//!   `PROT_NONE` and any access faults.
//! - Every non-adjacent mapping is one kernel VMA and the process may hold at most
//!   `vm.max_map_count` of them; [`HostBackend`] checks the headroom before each map and refuses
//!   with [`Error::MapCountExhausted`] instead of letting `mmap` fail deep inside an operation.
//! - Copies run on worker threads.

use crate::fork::ForkGuard;
use crate::worker::Worker;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use super::{
    check_multiple, Access, Backend, BackendInfo, BackendKind, BackendOp, Completion, CopyKind,
    CopyRegion, DetachRefused, Detached, HostBuffer, PageHandle, VaRange,
};
use crate::error::{Error, Result};

/// Default mapping unit of the host backend: 2 MiB, like CUDA's minimum granularity.
pub const DEFAULT_GRANULARITY: usize = 2 << 20;

/// Default number of mappings left to the rest of the process below `vm.max_map_count`.
pub const DEFAULT_MAP_COUNT_RESERVE: usize = 1024;

/// Regions larger than this are split between copy workers.
const COPY_SPLIT: usize = 4 << 20;

/// Arena growth step (the memfd is sparse: growth costs nothing until pages are allocated).
const ARENA_GROWTH: u64 = 64 << 30;

/// The most copy worker threads a host backend may start.
pub const MAX_COPY_THREADS: usize = 256;

/// Options of the host backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostConfig {
    /// Mapping unit in bytes; a positive multiple of the OS page size. Default 2 MiB.
    pub granularity: usize,
    /// Worker threads for [`Backend::copy_async`]. Default 4; at least 1 is used.
    pub copy_threads: usize,
    /// Overrides `vm.max_map_count` (read from `/proc/sys/vm/max_map_count` otherwise).
    pub max_map_count: Option<usize>,
    /// Mappings left for the rest of the process: maps are refused once the process would hold
    /// more than `max_map_count - map_count_reserve`. Default 1024.
    pub map_count_reserve: usize,
    /// Allocate a page's memory when it is created (default), like `cuMemCreate`. When false the
    /// memory is allocated on first touch.
    pub populate: bool,
    /// Reserved-but-unmapped ranges read as zeros (read-only anonymous memory) instead of
    /// faulting (`PROT_NONE`). Writes to them fault either way. Default: on.
    pub zero_page: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            granularity: DEFAULT_GRANULARITY,
            copy_threads: 4,
            max_map_count: None,
            map_count_reserve: DEFAULT_MAP_COUNT_RESERVE,
            populate: true,
            zero_page: true,
        }
    }
}

/// The OS page size.
pub fn os_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// `vm.max_map_count` as the kernel reports it, or the kernel's default (65530) if unreadable.
pub fn system_max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

/// Memory the host can still give this process: physical memory from `/proc/meminfo`, and the
/// limit of the process's memory cgroup (v2 or v1, the tightest over the cgroup and its
/// ancestors).
///
/// Host pages are memfd (shared memory) pages: the kernel charges them to the memory cgroup, but
/// a page that is created and not mapped does not count in the process's RSS, which is what the
/// OOM killer ranks processes by. So kvvm refuses up front a page budget the host cannot back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal`, in bytes.
    pub total: u64,
    /// `MemAvailable`, in bytes.
    pub available: u64,
    /// The tightest memory cgroup limit in bytes, `None` when no limit applies.
    pub cgroup_limit: Option<u64>,
    /// What that limit still allows (limit minus usage) in bytes, `None` when no limit applies.
    pub cgroup_remaining: Option<u64>,
}

impl HostMemory {
    /// Reads the current figures. Unreadable files count as "no information" (no limit).
    pub fn read() -> Self {
        let (total, available) = std::fs::read_to_string("/proc/meminfo")
            .map(|t| parse_meminfo(&t))
            .unwrap_or((0, 0));
        let mut m = HostMemory {
            total,
            available,
            cgroup_limit: None,
            cgroup_remaining: None,
        };
        if let Ok(cg) = std::fs::read_to_string("/proc/self/cgroup") {
            for (dir, v2) in cgroup_dirs(&cg) {
                if let Some((limit, usage)) = read_cgroup_limit(&dir, v2) {
                    let rest = limit.saturating_sub(usage);
                    if m.cgroup_remaining.is_none_or(|r| rest < r) {
                        m.cgroup_limit = Some(limit);
                        m.cgroup_remaining = Some(rest);
                    }
                }
            }
        }
        m
    }

    /// Bytes of new pages the host can back now: the smaller of `MemAvailable` and what the
    /// cgroup still allows (`u64::MAX` when nothing could be read).
    pub fn usable(&self) -> u64 {
        let physical = if self.total == 0 {
            u64::MAX
        } else {
            self.available
        };
        physical.min(self.cgroup_remaining.unwrap_or(u64::MAX))
    }
}

/// (`MemTotal`, `MemAvailable`) in bytes from the text of `/proc/meminfo` (0 when absent).
pub(crate) fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib.saturating_mul(1024))
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The memory cgroup directories that limit this process, from the text of `/proc/self/cgroup`:
/// its own cgroup and every ancestor, as (directory, is v2).
pub(crate) fn cgroup_dirs(proc_self_cgroup: &str) -> Vec<(std::path::PathBuf, bool)> {
    let mut out = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, v2) = if controllers.is_empty() {
            ("/sys/fs/cgroup", true)
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", false)
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(root);
        out.push((dir.clone(), v2));
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != "..") {
            dir.push(comp);
            out.push((dir.clone(), v2));
        }
    }
    out
}

/// (limit, usage) of one memory cgroup directory; `None` when it sets no limit or cannot be read.
fn read_cgroup_limit(dir: &std::path::Path, v2: bool) -> Option<(u64, u64)> {
    let (limit_file, usage_file) = if v2 {
        ("memory.max", "memory.current")
    } else {
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    };
    let limit = parse_cgroup_limit(&std::fs::read_to_string(dir.join(limit_file)).ok()?)?;
    let usage = std::fs::read_to_string(dir.join(usage_file))
        .ok()
        .and_then(|u| u.trim().parse().ok())
        .unwrap_or(0);
    Some((limit, usage))
}

/// A cgroup limit file's value: `None` for "max" (v2) or the huge value v1 uses for no limit.
pub(crate) fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let v: u64 = t.parse().ok()?;
    (v < 1 << 62).then_some(v)
}

/// Refuses (with [`Error::InvalidConfig`]) a page or a page budget that `usable` bytes cannot
/// back. `usable` is [`BackendInfo::usable_memory`](super::BackendInfo::usable_memory).
pub(crate) fn check_budget(usable: Option<u64>, page_size: usize, budget_bytes: u64) -> Result<()> {
    let Some(usable) = usable else {
        return Ok(());
    };
    if page_size as u64 > usable {
        return Err(Error::InvalidConfig(format!(
            "a page of {page_size} bytes is more host memory than this process may use \
             ({usable} bytes: MemAvailable and the memory cgroup limit)"
        )));
    }
    let pages = budget_bytes / page_size.max(1) as u64;
    let backed = pages.saturating_mul(page_size as u64);
    if backed > usable {
        return Err(Error::InvalidConfig(format!(
            "a page budget of {budget_bytes} bytes is more host memory than this process may \
             use ({usable} bytes: MemAvailable and the memory cgroup limit); lower the budget"
        )));
    }
    Ok(())
}

/// Pessimistic estimate of the process's mapping count, shared by every host backend: counted
/// from `/proc/self/maps` once per process, raised by every reservation and map of any backend
/// (never lowered), and recounted only when a check comes near a limit. Reading
/// `/proc/self/maps` costs time proportional to the process's mappings, so creating backends and
/// caches must not do it each time.
static VMA_ESTIMATE: AtomicUsize = AtomicUsize::new(0);
static VMA_COUNTED: std::sync::Once = std::sync::Once::new();

fn vma_estimate() -> &'static AtomicUsize {
    VMA_COUNTED.call_once(|| {
        if let Ok(n) = process_map_count() {
            VMA_ESTIMATE.fetch_max(n, Ordering::Relaxed);
        }
    });
    &VMA_ESTIMATE
}

/// Number of mappings (VMAs) this process holds now, from `/proc/self/maps`.
///
/// # Errors
/// [`Error::Backend`] if the file cannot be read.
pub fn process_map_count() -> Result<usize> {
    let data = std::fs::read("/proc/self/maps").map_err(|e| Error::Backend {
        backend: BackendKind::Host,
        op: BackendOp::Map,
        code: e.raw_os_error().unwrap_or(0) as i64,
        message: format!("reading /proc/self/maps: {e}"),
    })?;
    Ok(data.iter().filter(|&&b| b == b'\n').count())
}

fn prot_flags(access: Access) -> ProtFlags {
    match access {
        Access::ReadWrite => ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
        Access::ReadOnly => ProtFlags::PROT_READ,
    }
}

fn sys_err(op: BackendOp, what: &str, e: Errno) -> Error {
    Error::Backend {
        backend: BackendKind::Host,
        op,
        code: e as i64,
        message: format!("{what}: {} ({})", e.desc(), e),
    }
}

#[derive(Debug)]
struct Arena {
    /// Current size of the memfd.
    len: u64,
    /// Next never-used offset.
    next: u64,
    /// Released extents available for reuse, by size.
    free: HashMap<usize, Vec<u64>>,
    /// Live pages: offset → size.
    live: HashMap<u64, usize>,
}

/// The memfd behind every page and its allocation state.
#[derive(Debug)]
struct ArenaFile {
    memfd: OwnedFd,
    arena: Mutex<Arena>,
}

impl ArenaFile {
    /// Frees the memory of the extent `[offset, offset+size)` and makes it reusable. The extent
    /// must be a live page mapped nowhere.
    fn release(&self, arena: &mut Arena, offset: u64, size: usize) -> Result<()> {
        fallocate(
            self.memfd.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            size as i64,
        )
        .map_err(|e| sys_err(BackendOp::ReleasePage, "fallocate(PUNCH_HOLE)", e))?;
        arena.live.remove(&offset);
        arena.free.entry(size).or_default().push(offset);
        Ok(())
    }
}

/// Reservations and pages handed over by [`HostBackend::detach`](Backend::detach).
#[derive(Debug)]
struct HostDetached {
    ranges: Vec<VaRange>,
    /// The pages' extents (offset, size) in the arena.
    extents: Vec<(u64, usize)>,
    /// The backend's arena, if it still lives when this is dropped.
    file: Weak<ArenaFile>,
    fork: ForkGuard,
}

impl Detached for HostDetached {}

impl Drop for HostDetached {
    fn drop(&mut self) {
        if self.fork.inherited() {
            // The ranges were not inherited (MADV_DONTFORK) and the extents are the parent's.
            return;
        }
        for r in &self.ranges {
            if let Some(ptr) = NonNull::new(r.addr as usize as *mut libc::c_void) {
                // SAFETY: the range was a reservation of the backend, handed over to this owner
                // alone by `detach` (the backend forgot it); whoever read it through an export
                // has given it up, since this is dropped with the last export.
                if let Err(e) = unsafe { munmap(ptr, r.len) } {
                    tracing::warn!("unmapping a detached range {:#x}: {e}", r.addr);
                }
            }
        }
        // With the backend gone, its file closed when its last mapping went just now, and
        // every extent's memory with it; otherwise the extents go back to the arena.
        if let Some(file) = self.file.upgrade() {
            let mut arena = file.arena.lock().unwrap_or_else(|p| p.into_inner());
            for &(offset, size) in &self.extents {
                if let Err(e) = file.release(&mut arena, offset, size) {
                    tracing::warn!("releasing a detached page at arena offset {offset:#x}: {e}");
                }
            }
        }
    }
}

/// The host backend. See the [module documentation](self).
#[derive(Debug)]
pub struct HostBackend {
    config: HostConfig,
    /// The arena: shared with the [`Detached`] owners of ranges handed over by
    /// [`Backend::detach`], which hold it weakly (to return their extents if the backend still
    /// lives), so that they keep neither the file descriptor nor the backend alive.
    file: Arc<ArenaFile>,
    /// Live reservations: address → length.
    reservations: RwLock<BTreeMap<u64, usize>>,
    /// Maps are refused beyond this many process mappings.
    map_limit: usize,
    max_map_count: usize,
    host_buffers: Mutex<HashMap<u64, memmap2::MmapMut>>,
    copier: CopyPool,
    /// The process the backend belongs to (see [`crate::fork`]).
    fork: ForkGuard,
}

impl HostBackend {
    /// Creates a host backend.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the granularity is not a positive multiple of the OS page size;
    /// a backend error if the memfd cannot be created.
    pub fn new(config: HostConfig) -> Result<Self> {
        let os_page = os_page_size();
        if config.granularity == 0 || config.granularity % os_page != 0 {
            return Err(Error::InvalidConfig(format!(
                "host granularity {} is not a positive multiple of the OS page size {os_page}",
                config.granularity
            )));
        }
        let memfd = memfd_create(c"kvvm-arena", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| sys_err(BackendOp::CreatePage, "memfd_create", e))?;
        if config.copy_threads > MAX_COPY_THREADS {
            return Err(Error::InvalidConfig(format!(
                "copy_threads {} exceeds {MAX_COPY_THREADS}",
                config.copy_threads
            )));
        }
        let copier = CopyPool::new(config.copy_threads.max(1))?;
        let max_map_count = config.max_map_count.unwrap_or_else(system_max_map_count);
        let map_limit = max_map_count.saturating_sub(config.map_count_reserve);
        // Counts the process's mappings the first time only (see `vma_estimate`).
        vma_estimate();
        let backend = HostBackend {
            config,
            file: Arc::new(ArenaFile {
                memfd,
                arena: Mutex::new(Arena {
                    len: 0,
                    next: 0,
                    free: HashMap::new(),
                    live: HashMap::new(),
                }),
            }),
            reservations: RwLock::new(BTreeMap::new()),
            map_limit,
            max_map_count,
            host_buffers: Mutex::new(HashMap::new()),
            copier,
            fork: ForkGuard::new(),
        };
        Ok(backend)
    }

    /// The configuration this backend was created with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Pages created and not yet released.
    pub fn live_pages(&self) -> usize {
        self.file
            .arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .len()
    }

    /// Bytes of memory the arena holds now (the memfd's allocated blocks).
    ///
    /// # Errors
    /// A backend error if `fstat` fails.
    pub fn arena_resident_bytes(&self) -> Result<u64> {
        let st = nix::sys::stat::fstat(self.file.memfd.as_raw_fd())
            .map_err(|e| sys_err(BackendOp::CreatePage, "fstat", e))?;
        Ok(st.st_blocks as u64 * 512)
    }

    /// Checks that `[va, va+len)` is granularity-aligned and inside one reservation.
    fn check_range(&self, va: u64, len: usize) -> Result<()> {
        let g = self.config.granularity as u64;
        if va % g != 0 || len == 0 || len as u64 % g != 0 {
            return Err(Error::InvalidArgument(format!(
                "range {va:#x}+{len:#x} is not aligned to the granularity {g:#x}"
            )));
        }
        let res = self.reservations.read().unwrap_or_else(|p| p.into_inner());
        match res.range(..=va).next_back() {
            Some((&base, &rlen))
                if (VaRange {
                    addr: base,
                    len: rlen,
                })
                .contains(va, len) =>
            {
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "range {va:#x}+{len:#x} is not inside a reservation of this backend"
            ))),
        }
    }

    /// Refuses with [`Error::MapCountExhausted`] if `needed` more mappings would pass the limit.
    fn check_headroom(&self, needed: usize) -> Result<()> {
        if vma_estimate().load(Ordering::Relaxed) + needed <= self.map_limit {
            return Ok(());
        }
        let actual = process_map_count()?;
        vma_estimate().store(actual, Ordering::Relaxed);
        if actual + needed <= self.map_limit {
            Ok(())
        } else {
            Err(Error::MapCountExhausted {
                in_use: actual,
                needed,
                limit: self.map_limit,
            })
        }
    }

    /// The protection of reserved-but-unmapped memory: read-only zeros, or none.
    fn unmapped_prot(&self) -> ProtFlags {
        if self.config.zero_page {
            ProtFlags::PROT_READ
        } else {
            ProtFlags::PROT_NONE
        }
    }

    /// Maps `[va, va+len)` back to reserved memory (zeros read-only, or inaccessible).
    fn unmap_raw(&self, va: u64, len: usize) -> Result<()> {
        let addr = NonZeroUsize::new(va as usize)
            .ok_or_else(|| Error::InvalidArgument("null address".into()))?;
        let length = NonZeroUsize::new(len)
            .ok_or_else(|| Error::InvalidArgument("zero-length unmap".into()))?;
        // SAFETY: the range lies inside a reservation this backend owns (checked by the callers),
        // so replacing it with inaccessible anonymous memory cannot clobber memory owned by anyone
        // else; callers guarantee no Rust reference into the range outlives the mapping.
        unsafe {
            mmap_anonymous(
                Some(addr),
                length,
                self.unmapped_prot(),
                MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|e| sys_err(BackendOp::Unmap, "mmap(MAP_FIXED) of the reserved range", e))?;
        dont_fork(va, len);
        Ok(())
    }
}

/// Keeps `[addr, addr+len)` (inside a reservation) out of any child process: after `fork()` the
/// child has no mapping there, so it can neither read nor write the parent's pages through the
/// addresses it inherited. Every mapping made in a reservation gets the flag too, so that the
/// kernel still merges neighbouring inaccessible ranges.
fn dont_fork(addr: u64, len: usize) {
    // SAFETY: madvise(MADV_DONTFORK) changes only whether the range is copied into a child; the
    // range lies in a reservation of this backend.
    let rc = unsafe { libc::madvise(addr as usize as *mut libc::c_void, len, libc::MADV_DONTFORK) };
    if rc != 0 {
        tracing::warn!(
            "madvise(MADV_DONTFORK) on {addr:#x}+{len:#x} failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for HostBackend {
    fn drop(&mut self) {
        if self.fork.inherited() {
            // The reservations were not inherited (MADV_DONTFORK): their addresses may hold
            // something else of the child's by now.
            return;
        }
        let res = std::mem::take(
            self.reservations
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (addr, len) in res {
            if let Some(ptr) = NonNull::new(addr as usize as *mut libc::c_void) {
                // SAFETY: the reservation was created by `reserve` and is owned by this backend;
                // no one can use it after the backend is dropped.
                let _ = unsafe { munmap(ptr, len) };
            }
        }
    }
}

impl Backend for HostBackend {
    fn info(&self) -> BackendInfo {
        // Read once per process: every cache creation asks for the backend's info.
        static CPU: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let cpu = CPU.get_or_init(|| {
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split(':').nth(1))
                        .map(|v| v.trim().to_string())
                })
                .unwrap_or_else(|| std::env::consts::ARCH.to_string())
        });
        // SAFETY: sysconf has no memory-safety preconditions.
        let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(0) as u64;
        BackendInfo {
            kind: BackendKind::Host,
            device_name: format!("host ({cpu})"),
            device_ordinal: 0,
            granularity: self.config.granularity,
            total_memory: pages * os_page_size() as u64,
            max_map_count: Some(self.max_map_count),
            // From the shared estimate (a lower bound): `map_headroom` recounts.
            map_headroom: Some(
                self.map_limit
                    .saturating_sub(vma_estimate().load(Ordering::Relaxed)),
            ),
            // Without `populate`, a page takes memory only where it is touched: no budget is
            // committed up front, so none is checked.
            usable_memory: self.config.populate.then(|| HostMemory::read().usable()),
        }
    }

    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn granularity(&self) -> usize {
        self.config.granularity
    }

    fn reserve(&self, len: usize) -> Result<VaRange> {
        self.fork.check("host backend")?;
        check_multiple("reservation", len, self.config.granularity)?;
        self.check_headroom(1)?;
        // Over-reserve by one granule and trim, so that the range is aligned to the granularity.
        let g = self.config.granularity;
        let padded = len
            .checked_add(g)
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("reservation of {len} bytes overflows"))
            })?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses touches no existing
        // memory.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                padded,
                self.unmapped_prot(),
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|e| sys_err(BackendOp::Reserve, "mmap(MAP_NORESERVE)", e))?;
        let raw = ptr.as_ptr() as usize;
        let aligned = raw.next_multiple_of(g);
        let head = aligned - raw;
        let tail = g - head;
        for (at, n) in [(raw, head), (aligned + len, tail)] {
            if let Some(p) = NonNull::new(at as *mut libc::c_void) {
                if n > 0 {
                    // SAFETY: `[at, at+n)` is slack of the mapping made just above, outside the
                    // range handed out; nothing uses it.
                    let _ = unsafe { munmap(p, n) };
                }
            }
        }
        let addr = aligned as u64;
        dont_fork(addr, len);
        vma_estimate().fetch_add(1, Ordering::Relaxed);
        self.reservations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, len);
        Ok(VaRange { addr, len })
    }

    fn free_reservation(&self, range: VaRange) -> Result<()> {
        let mut res = self.reservations.write().unwrap_or_else(|p| p.into_inner());
        if res.get(&range.addr) != Some(&range.len) {
            return Err(Error::InvalidArgument(format!(
                "{:#x}+{:#x} is not a reservation of this backend",
                range.addr, range.len
            )));
        }
        let ptr = NonNull::new(range.addr as usize as *mut libc::c_void)
            .ok_or_else(|| Error::InvalidArgument("null reservation".into()))?;
        // SAFETY: the range is exactly a reservation made by `reserve` (checked above) and the
        // caller gives it up; nothing else lives there.
        unsafe { munmap(ptr, range.len) }
            .map_err(|e| sys_err(BackendOp::FreeReservation, "munmap", e))?;
        res.remove(&range.addr);
        Ok(())
    }

    fn detach(
        &self,
        ranges: Vec<VaRange>,
        pages: Vec<PageHandle>,
    ) -> std::result::Result<Box<dyn Detached>, DetachRefused> {
        if self.fork.inherited() {
            return Err((ranges, pages));
        }
        let mut res = self.reservations.write().unwrap_or_else(|p| p.into_inner());
        let arena = self.file.arena.lock().unwrap_or_else(|p| p.into_inner());
        let known = ranges.iter().all(|r| res.get(&r.addr) == Some(&r.len))
            && pages
                .iter()
                .all(|p| arena.live.get(&p.raw()) == Some(&p.size()));
        if !known {
            return Err((ranges, pages));
        }
        for r in &ranges {
            res.remove(&r.addr);
        }
        // The extents stay in `live`: the arena must not hand them out while they are mapped.
        Ok(Box::new(HostDetached {
            ranges,
            extents: pages.iter().map(|p| (p.raw(), p.size())).collect(),
            file: Arc::downgrade(&self.file),
            fork: self.fork,
        }))
    }

    fn create_page(&self, size: usize) -> Result<PageHandle> {
        self.fork.check("host backend")?;
        check_multiple("page", size, self.config.granularity)?;
        let mut arena = self.file.arena.lock().unwrap_or_else(|p| p.into_inner());
        let reused = arena.free.get_mut(&size).and_then(|v| v.pop());
        let offset = match reused {
            Some(off) => off,
            None => {
                let off = arena.next;
                let end = off + size as u64;
                if end > arena.len {
                    let new_len = end.max(arena.len + ARENA_GROWTH);
                    nix::unistd::ftruncate(&self.file.memfd, new_len as i64)
                        .map_err(|e| sys_err(BackendOp::CreatePage, "ftruncate(memfd)", e))?;
                    arena.len = new_len;
                }
                arena.next = end;
                off
            }
        };
        if self.config.populate {
            if let Err(e) = fallocate(
                self.file.memfd.as_raw_fd(),
                FallocateFlags::empty(),
                offset as i64,
                size as i64,
            ) {
                // Give the extent back: it holds nothing worth keeping.
                let _ = fallocate(
                    self.file.memfd.as_raw_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    size as i64,
                );
                arena.free.entry(size).or_default().push(offset);
                return Err(sys_err(BackendOp::CreatePage, "fallocate(memfd)", e));
            }
        }
        arena.live.insert(offset, size);
        Ok(PageHandle::from_raw(offset, size))
    }

    fn release_page(&self, page: PageHandle) -> std::result::Result<(), (PageHandle, Error)> {
        if let Err(e) = self.fork.check("host backend") {
            // Punching a hole would destroy the parent's page.
            return Err((page, e));
        }
        let mut arena = self.file.arena.lock().unwrap_or_else(|p| p.into_inner());
        if arena.live.get(&page.raw()) != Some(&page.size()) {
            let e = Error::InvalidArgument(format!(
                "page at arena offset {:#x} ({} bytes) is not a live page of this backend",
                page.raw(),
                page.size()
            ));
            return Err((page, e));
        }
        let (offset, size) = (page.raw(), page.size());
        match self.file.release(&mut arena, offset, size) {
            Ok(()) => Ok(()),
            Err(e) => Err((page, e)),
        }
    }

    fn map(&self, va: u64, pages: &[&PageHandle]) -> Result<()> {
        self.map_with_access(va, pages, Access::ReadWrite)
    }

    fn map_with_access(&self, va: u64, pages: &[&PageHandle], access: Access) -> Result<()> {
        self.fork.check("host backend")?;
        if pages.is_empty() {
            return Ok(());
        }
        let total: usize = pages.iter().map(|p| p.size()).sum();
        self.check_range(va, total)?;
        // Group consecutive arena offsets into runs, validating every page.
        let mut runs: Vec<(u64, usize)> = Vec::new(); // (arena offset, len)
        {
            let arena = self.file.arena.lock().unwrap_or_else(|p| p.into_inner());
            for p in pages {
                if arena.live.get(&p.raw()) != Some(&p.size()) {
                    return Err(Error::InvalidArgument(format!(
                        "page at arena offset {:#x} is not a live page of this backend",
                        p.raw()
                    )));
                }
                match runs.last_mut() {
                    Some((off, len)) if *off + *len as u64 == p.raw() => *len += p.size(),
                    _ => runs.push((p.raw(), p.size())),
                }
            }
        }
        // Each run may split the surrounding reservation mapping in three.
        self.check_headroom(2 * runs.len())?;
        let mut addr = va;
        for (i, &(off, len)) in runs.iter().enumerate() {
            let at = NonZeroUsize::new(addr as usize);
            let length = NonZeroUsize::new(len);
            let result = match (at, length) {
                (Some(at), Some(length)) => {
                    // SAFETY: `[addr, addr+len)` lies inside a reservation of this backend
                    // (check_range), which holds no Rust-visible memory; MAP_FIXED replaces only
                    // that reserved range with the memfd extent `[off, off+len)`, which is live.
                    unsafe {
                        mmap(
                            Some(at),
                            length,
                            prot_flags(access),
                            MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                            &self.file.memfd,
                            off as i64,
                        )
                    }
                    .map(|_| dont_fork(addr, len))
                }
                _ => Err(Errno::EINVAL),
            };
            if let Err(e) = result {
                // Undo the runs already mapped so that the range is left as it was.
                if addr > va {
                    let _ = self.unmap_raw(va, (addr - va) as usize);
                }
                let err = if e == Errno::ENOMEM {
                    Error::MapCountExhausted {
                        in_use: process_map_count().unwrap_or(0),
                        needed: 2 * (runs.len() - i),
                        limit: self.map_limit,
                    }
                } else {
                    sys_err(BackendOp::Map, "mmap(MAP_FIXED|MAP_SHARED, memfd)", e)
                };
                return Err(err);
            }
            addr += len as u64;
        }
        vma_estimate().fetch_add(2 * runs.len(), Ordering::Relaxed);
        Ok(())
    }

    fn unmap(&self, va: u64, len: usize) -> Result<()> {
        self.fork.check("host backend")?;
        self.check_range(va, len)?;
        self.unmap_raw(va, len)
    }

    fn protect(&self, va: u64, len: usize, access: Access) -> Result<()> {
        self.fork.check("host backend")?;
        self.check_range(va, len)?;
        // Changing part of a mapping splits it: up to two more mappings.
        self.check_headroom(2)?;
        // SAFETY: the range lies inside a reservation of this backend (check_range), which holds
        // no Rust-visible memory; changing its protection affects only accesses through raw
        // pointers that the cache's callers make, and the contract makes it whole mapped pages.
        let r = unsafe {
            libc::mprotect(
                va as usize as *mut libc::c_void,
                len,
                prot_flags(access).bits(),
            )
        };
        if r != 0 {
            return Err(sys_err(BackendOp::Protect, "mprotect", Errno::last()));
        }
        vma_estimate().fetch_add(2, Ordering::Relaxed);
        Ok(())
    }

    fn alloc_host(&self, len: usize) -> Result<HostBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument("zero-length host buffer".into()));
        }
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|e| Error::Backend {
                backend: BackendKind::Host,
                op: BackendOp::AllocHost,
                code: e.raw_os_error().unwrap_or(0) as i64,
                message: format!("anonymous mmap of {len} bytes: {e}"),
            })?;
        let addr = map.as_ptr() as usize as u64;
        self.host_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, map);
        Ok(HostBuffer::from_raw(addr, len))
    }

    fn free_host(&self, buf: HostBuffer) -> std::result::Result<(), (HostBuffer, Error)> {
        let mut bufs = self.host_buffers.lock().unwrap_or_else(|p| p.into_inner());
        match bufs.get(&buf.addr()) {
            Some(m) if m.len() == buf.len() => {
                bufs.remove(&buf.addr());
                Ok(())
            }
            _ => {
                let e = Error::InvalidArgument(format!(
                    "{:#x}+{} is not a host buffer of this backend",
                    buf.addr(),
                    buf.len()
                ));
                Err((buf, e))
            }
        }
    }

    unsafe fn copy_async(
        &self,
        _kind: CopyKind,
        regions: &[CopyRegion],
    ) -> Result<Box<dyn Completion>> {
        // Split large regions so that several workers share them.
        let mut jobs = Vec::new();
        for r in regions {
            let mut done = 0;
            while done < r.len {
                let n = (r.len - done).min(COPY_SPLIT);
                jobs.push(CopyRegion {
                    dst: r.dst + done as u64,
                    src: r.src + done as u64,
                    len: n,
                });
                done += n;
            }
        }
        Ok(Box::new(self.copier.submit(jobs)))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn map_headroom(&self) -> Option<usize> {
        let est = vma_estimate().load(Ordering::Relaxed);
        if self.map_limit.saturating_sub(est) >= self.map_limit / 2 {
            // Far from the limit even by the pessimistic estimate: no need to read
            // /proc/self/maps (whose cost grows with the process's mappings).
            return Some(self.map_limit - est);
        }
        let actual = process_map_count().ok()?;
        vma_estimate().store(actual, Ordering::Relaxed);
        Some(self.map_limit.saturating_sub(actual))
    }
}

// ---------------------------------------------------------------------------------------------
// Copy workers

#[derive(Debug, Default)]
struct CopyState {
    remaining: Mutex<usize>,
    cv: Condvar,
}

/// Completion of a host copy.
#[derive(Debug)]
pub struct HostCompletion {
    state: Arc<CopyState>,
}

impl Completion for HostCompletion {
    fn poll(&self) -> Result<bool> {
        Ok(*self
            .state
            .remaining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            == 0)
    }

    fn wait(&self) -> Result<()> {
        let mut rem = self
            .state
            .remaining
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while *rem > 0 {
            rem = self.state.cv.wait(rem).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }
}

struct CopyJob {
    region: CopyRegion,
    state: Arc<CopyState>,
}

#[derive(Debug)]
struct CopyPool {
    tx: Option<crossbeam_channel::Sender<CopyJob>>,
    workers: Vec<Worker>,
}

impl CopyPool {
    fn new(threads: usize) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<CopyJob>();
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let rx = rx.clone();
            let h = Worker::spawn("kvvm-copy", move || {
                for job in rx {
                    let r = job.region;
                    // SAFETY: `copy_async`'s contract makes the submitter guarantee that both
                    // ranges are valid, non-overlapping and untouched by anyone else until the
                    // completion reports done, which happens only after this copy.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            r.src as usize as *const u8,
                            r.dst as usize as *mut u8,
                            r.len,
                        )
                    };
                    let mut rem = job
                        .state
                        .remaining
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    *rem -= 1;
                    if *rem == 0 {
                        job.state.cv.notify_all();
                    }
                }
            })?;
            workers.push(h);
        }
        Ok(CopyPool {
            tx: Some(tx),
            workers,
        })
    }

    fn submit(&self, jobs: Vec<CopyRegion>) -> HostCompletion {
        let state = Arc::new(CopyState {
            remaining: Mutex::new(jobs.len()),
            cv: Condvar::new(),
        });
        if let Some(tx) = &self.tx {
            for region in jobs {
                // The receivers live as long as `self`, so sending cannot fail while we exist.
                let _ = tx.send(CopyJob {
                    region,
                    state: state.clone(),
                });
            }
        }
        HostCompletion { state }
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        // Closing the channel lets the workers finish queued copies and exit.
        self.tx.take();
        for mut w in self.workers.drain(..) {
            w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields() {
        let t = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(t), (24576000 * 1024, 20000000 * 1024));
        assert_eq!(parse_meminfo("nothing"), (0, 0));
    }

    #[test]
    fn cgroup_limits() {
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_cgroup_limit("garbage"), None);
    }

    #[test]
    fn cgroup_directories_v1_and_v2() {
        let v2 = cgroup_dirs("0::/user.slice/app.scope\n");
        assert_eq!(
            v2,
            vec![
                ("/sys/fs/cgroup".into(), true),
                ("/sys/fs/cgroup/user.slice".into(), true),
                ("/sys/fs/cgroup/user.slice/app.scope".into(), true),
            ]
        );
        let v1 = cgroup_dirs("5:cpu,cpuacct:/x\n4:memory:/process_api/abc\n0::/\n");
        assert_eq!(
            v1,
            vec![
                ("/sys/fs/cgroup/memory".into(), false),
                ("/sys/fs/cgroup/memory/process_api".into(), false),
                ("/sys/fs/cgroup/memory/process_api/abc".into(), false),
                ("/sys/fs/cgroup".into(), true),
            ]
        );
    }

    #[test]
    fn budget_check() {
        let page = 2 << 20;
        assert!(check_budget(None, page, u64::MAX).is_ok());
        assert!(check_budget(Some(1 << 30), page, 1 << 30).is_ok());
        // The budget is counted in whole pages.
        assert!(check_budget(Some(1 << 30), page, (1 << 30) + 4096).is_ok());
        assert!(matches!(
            check_budget(Some(1 << 30), page, (1 << 30) + (2 << 20)),
            Err(Error::InvalidConfig(m)) if m.contains("memory")
        ));
        assert!(matches!(
            check_budget(Some(1 << 20), page, 4 << 20),
            Err(Error::InvalidConfig(m)) if m.contains("a page of")
        ));
        let usable = HostMemory {
            total: 8 << 30,
            available: 4 << 30,
            cgroup_limit: Some(3 << 30),
            cgroup_remaining: Some(1 << 30),
        }
        .usable();
        assert_eq!(usable, 1 << 30);
        assert_eq!(HostMemory::default().usable(), u64::MAX);
    }

    #[test]
    fn this_machine_has_memory() {
        let m = HostMemory::read();
        assert!(
            m.total > 0 && m.available > 0 && m.available <= m.total,
            "{m:?}"
        );
        assert!(m.usable() <= m.available);
    }
}
