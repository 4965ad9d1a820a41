//! Host backend and page pool: the contract of DESIGN.md §2 on real mappings.

use std::sync::Arc;

use kvvm::pool::{PagePool, PoolConfig};
use kvvm::vmm::faulty::FaultyBackend;
use kvvm::vmm::host::{process_map_count, HostBackend, HostConfig};
use kvvm::vmm::{Backend, BackendOp, CopyKind, CopyRegion};
use kvvm::Error;

const PAGE: usize = 64 << 10;

fn host(granularity: usize) -> Arc<HostBackend> {
    host_with(granularity, true)
}

/// A host backend with or without the zero page behind unmapped ranges.
fn host_with(granularity: usize, zero_page: bool) -> Arc<HostBackend> {
    Arc::new(
        HostBackend::new(HostConfig {
            granularity,
            zero_page,
            ..HostConfig::default()
        })
        .expect("host backend"),
    )
}

fn fill(addr: u64, len: usize, seed: u8) {
    // SAFETY: callers pass a range they just mapped read/write.
    let s = unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = seed.wrapping_add((i % 251) as u8);
    }
}

fn check(addr: u64, len: usize, seed: u8) -> bool {
    // SAFETY: callers pass a range that is mapped readable.
    let s = unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) };
    s.iter()
        .enumerate()
        .all(|(i, &b)| b == seed.wrapping_add((i % 251) as u8))
}

/// The protection string of the mapping containing `addr`, from /proc/self/maps.
fn prot_at(addr: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let range = it.next()?;
        let perms = it.next()?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        (a <= addr && addr < b).then(|| perms.to_string())
    })
}

/// The mappings of this process that overlap `[addr, addr + len)` (other threads may map and
/// unmap elsewhere meanwhile, so a process-wide count is not a reliable measure).
fn vmas_in(addr: u64, len: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < addr + len as u64 && addr < b)
        .count()
}

/// Touches `addr` in a forked child; returns the signal that killed it, if any.
fn touch_in_child(addr: u64) -> Option<nix::sys::signal::Signal> {
    access_in_child(addr, false).err()
}

/// Reads (or, with `write`, writes) one byte at `addr` of this process the way the kernel
/// checks a user access, without faulting: `process_vm_readv`/`process_vm_writev` on this
/// process. `Ok(the byte read)`, or `Err(EFAULT)` where a load (or store) would raise SIGSEGV.
/// (A forked child cannot probe the backend's ranges: they are `MADV_DONTFORK`.)
fn probe(addr: u64, write: bool) -> Result<u8, nix::errno::Errno> {
    let mut byte = [1u8];
    let local = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: both iovecs describe one byte: `byte` is ours, and the kernel checks the remote
    // address against this process's mappings, reporting EFAULT instead of faulting.
    let n = unsafe {
        if write {
            libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0)
        } else {
            libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
        }
    };
    if n == 1 {
        Ok(byte[0])
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// Reads (or, with `write`, writes a byte to) `addr` in a forked child: `Ok(the byte read)`, or
/// `Err(the signal that killed the child)`.
fn access_in_child(addr: u64, write: bool) -> Result<u8, nix::sys::signal::Signal> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    // SAFETY: the child only performs a volatile access and `_exit`, both async-signal-safe.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let p = addr as usize as *mut u8;
            let v = if write {
                // SAFETY: deliberately writing a possibly read-only address in a throwaway child.
                unsafe { std::ptr::write_volatile(p, 1) };
                0
            } else {
                // SAFETY: deliberately touching a possibly inaccessible address in a throwaway
                // child.
                unsafe { std::ptr::read_volatile(p) }
            };
            // SAFETY: _exit is async-signal-safe and ends the child without running destructors.
            unsafe { libc::_exit(i32::from(v)) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Signaled(_, sig, _) => Err(sig),
            WaitStatus::Exited(_, code) => Ok(code as u8),
            other => panic!("child ended with {other:?}"),
        },
    }
}

#[test]
fn aliasing_and_remap_keep_bytes() {
    let b = host(PAGE);
    let r1 = b.reserve(4 * PAGE).unwrap();
    let r2 = b.reserve(4 * PAGE).unwrap();
    let p = b.create_page(PAGE).unwrap();
    b.map(r1.addr + PAGE as u64, &[&p]).unwrap();
    b.map(r2.addr + 3 * PAGE as u64, &[&p]).unwrap();
    fill(r1.addr + PAGE as u64, PAGE, 7);
    assert!(
        check(r2.addr + 3 * PAGE as u64, PAGE, 7),
        "alias sees the bytes"
    );
    b.unmap(r1.addr + PAGE as u64, PAGE).unwrap();
    b.unmap(r2.addr + 3 * PAGE as u64, PAGE).unwrap();
    // Remap the same page elsewhere: contents survive unmap.
    b.map(r2.addr, &[&p]).unwrap();
    assert!(check(r2.addr, PAGE, 7), "bytes survive unmap + remap");
    b.unmap(r2.addr, PAGE).unwrap();
    b.release_page(p).map_err(|(_, e)| e).unwrap();
    b.free_reservation(r1).unwrap();
    b.free_reservation(r2).unwrap();
}

#[test]
fn consecutive_pages_map_as_one_run() {
    let b = host(PAGE);
    let r = b.reserve(8 * PAGE).unwrap();
    let pages: Vec<_> = (0..4).map(|_| b.create_page(PAGE).unwrap()).collect();
    // Fresh pages come from consecutive arena offsets.
    for w in pages.windows(2) {
        assert_eq!(w[0].raw() + PAGE as u64, w[1].raw());
    }
    let before = vmas_in(r.addr, 8 * PAGE);
    b.map(r.addr, &pages.iter().collect::<Vec<_>>()).unwrap();
    let after = vmas_in(r.addr, 8 * PAGE);
    // One run: the reservation splits into [mapping][rest].
    assert_eq!(
        (before, after),
        (1, 2),
        "one mapping for a run of consecutive pages"
    );
    let rev: Vec<_> = pages.iter().rev().collect();
    b.unmap(r.addr, 4 * PAGE).unwrap();
    b.map(r.addr, &rev).unwrap();
    // Reverse order: no two neighbours have consecutive offsets, four mappings (and the rest).
    assert_eq!(
        vmas_in(r.addr, 8 * PAGE),
        5,
        "one mapping per page out of order"
    );
    b.unmap(r.addr, 4 * PAGE).unwrap();
    b.map(r.addr, &pages.iter().collect::<Vec<_>>()).unwrap();
    for (i, _) in pages.iter().enumerate() {
        fill(r.addr + (i * PAGE) as u64, PAGE, i as u8);
    }
    b.unmap(r.addr, 4 * PAGE).unwrap();
    // Map in reverse order: four runs, and each page keeps its own bytes.
    let rev: Vec<_> = pages.iter().rev().collect();
    b.map(r.addr, &rev).unwrap();
    for i in 0..4 {
        assert!(check(r.addr + (i * PAGE) as u64, PAGE, (3 - i) as u8));
    }
    b.unmap(r.addr, 4 * PAGE).unwrap();
    for p in pages {
        b.release_page(p).map_err(|(_, e)| e).unwrap();
    }
}

#[test]
fn unmapped_range_reads_zeros_with_the_zero_page() {
    // The default: a stray read of reserved-but-unmapped memory returns zeros; writes fault.
    let b = host(PAGE);
    let r = b.reserve(2 * PAGE).unwrap();
    assert_eq!(prot_at(r.addr).as_deref(), Some("r--p"));
    // SAFETY: the reservation is readable (zeros) and owned by this test.
    let before = unsafe { std::slice::from_raw_parts(r.addr as usize as *const u8, 2 * PAGE) };
    assert!(before.iter().all(|&x| x == 0));
    assert_eq!(probe(r.addr + 5, false), Ok(0));
    assert_eq!(
        probe(r.addr + 5, true),
        Err(nix::errno::Errno::EFAULT),
        "writes to an unmapped range still fault"
    );
    let p = b.create_page(PAGE).unwrap();
    b.map(r.addr, &[&p]).unwrap();
    fill(r.addr, PAGE, 9);
    assert_eq!(probe(r.addr + 5, false), Ok(9 + 5));
    b.unmap(r.addr, PAGE).unwrap();
    // After unmapping: zeros again (the page keeps its bytes: mapped again, they are back).
    assert_eq!(prot_at(r.addr).as_deref(), Some("r--p"));
    // SAFETY: as above; the range is unmapped and reads as zeros.
    let after = unsafe { std::slice::from_raw_parts(r.addr as usize as *const u8, PAGE) };
    assert!(
        after.iter().all(|&x| x == 0),
        "an unmapped range reads zeros"
    );
    assert_eq!(probe(r.addr, true), Err(nix::errno::Errno::EFAULT));
    b.map(r.addr + PAGE as u64, &[&p]).unwrap();
    assert!(check(r.addr + PAGE as u64, PAGE, 9));
    b.unmap(r.addr + PAGE as u64, PAGE).unwrap();
    b.release_page(p).map_err(|(_, e)| e).unwrap();
    b.free_reservation(r).unwrap();
}

#[test]
fn unmapped_range_is_inaccessible_without_the_zero_page() {
    let b = host_with(PAGE, false);
    let r = b.reserve(2 * PAGE).unwrap();
    assert_eq!(prot_at(r.addr).as_deref(), Some("---p"));
    // Without the zero page a read of the unmapped range faults (SIGSEGV in a load).
    assert_eq!(probe(r.addr, false), Err(nix::errno::Errno::EFAULT));
    let p = b.create_page(PAGE).unwrap();
    b.map(r.addr, &[&p]).unwrap();
    assert_eq!(prot_at(r.addr).as_deref(), Some("rw-s"));
    // SAFETY: the page was just mapped read/write at `r.addr`.
    unsafe { (r.addr as usize as *mut u8).write_volatile(7) };
    // SAFETY: as above.
    assert_eq!(unsafe { (r.addr as usize as *const u8).read_volatile() }, 7);
    // A child process does not inherit the mapping (MADV_DONTFORK): it cannot reach the page.
    assert_eq!(
        touch_in_child(r.addr),
        Some(nix::sys::signal::Signal::SIGSEGV),
        "a forked child reached a mapped page"
    );
    b.unmap(r.addr, PAGE).unwrap();
    assert_eq!(prot_at(r.addr).as_deref(), Some("---p"));
    assert_eq!(probe(r.addr, false), Err(nix::errno::Errno::EFAULT));
    b.release_page(p).map_err(|(_, e)| e).unwrap();
}

#[test]
fn released_pages_free_memory() {
    let b = host(PAGE);
    let pages: Vec<_> = (0..16).map(|_| b.create_page(PAGE).unwrap()).collect();
    let held = b.arena_resident_bytes().unwrap();
    assert!(
        held >= 16 * PAGE as u64,
        "created pages are allocated: {held}"
    );
    for p in pages {
        b.release_page(p).map_err(|(_, e)| e).unwrap();
    }
    let after = b.arena_resident_bytes().unwrap();
    assert!(
        after < held,
        "punching holes frees memory: {held} -> {after}"
    );
    assert_eq!(after, 0);
    assert_eq!(b.live_pages(), 0);
}

#[test]
fn bad_arguments_are_typed_errors() {
    let b = host(PAGE);
    assert!(matches!(b.reserve(0), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        b.reserve(PAGE + 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(b.create_page(100), Err(Error::InvalidArgument(_))));
    let r = b.reserve(2 * PAGE).unwrap();
    let p = b.create_page(PAGE).unwrap();
    // Outside the reservation, misaligned, and past its end.
    assert!(matches!(
        b.map(0x1000, &[&p]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.map(r.addr + 1, &[&p]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.map(r.addr + 2 * PAGE as u64, &[&p]),
        Err(Error::InvalidArgument(_))
    ));
    let bogus = kvvm::vmm::PageHandle::from_raw(1 << 40, PAGE);
    assert!(matches!(
        b.map(r.addr, &[&bogus]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(b.release_page(bogus).is_err());
    assert!(HostBackend::new(HostConfig {
        granularity: 1000,
        ..HostConfig::default()
    })
    .is_err());
    b.release_page(p).map_err(|(_, e)| e).unwrap();
}

#[test]
fn map_count_exhaustion_is_refused_cleanly() {
    let now = process_map_count().unwrap();
    let b = HostBackend::new(HostConfig {
        granularity: PAGE,
        max_map_count: Some(now + 40),
        map_count_reserve: 0,
        copy_threads: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let r = b.reserve(256 * PAGE).unwrap();
    let pages: Vec<_> = (0..64).map(|_| b.create_page(PAGE).unwrap()).collect();
    // Map every other page slot so that no two mappings merge.
    let mut mapped = Vec::new();
    let mut err = None;
    for (i, p) in pages.iter().enumerate() {
        let va = r.addr + (2 * i * PAGE) as u64;
        match b.map(va, &[p]) {
            Ok(()) => {
                fill(va, PAGE, i as u8);
                mapped.push((i, va));
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("the limit is reached");
    assert!(
        matches!(err, Error::MapCountExhausted { .. }),
        "got {err:?}"
    );
    assert!(err.is_exhaustion());
    assert!(!mapped.is_empty());
    // Everything mapped before the refusal is intact, and unmapping restores headroom.
    for &(i, va) in &mapped {
        assert!(check(va, PAGE, i as u8));
    }
    for &(_, va) in &mapped {
        b.unmap(va, PAGE).unwrap();
    }
    b.map(r.addr, &[&pages[0]]).unwrap();
    assert!(check(r.addr, PAGE, 0));
    b.unmap(r.addr, PAGE).unwrap();
}

#[test]
fn pool_budget_exhaustion_leaves_pool_consistent() {
    let b = host(PAGE);
    let pool = PagePool::new(
        b.clone(),
        PoolConfig {
            background: false,
            ..PoolConfig::with_budget(PAGE, 10 * PAGE as u64)
        },
    )
    .unwrap();
    let a = pool.acquire(7).unwrap();
    let err = pool.acquire(4).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BudgetExhausted {
                needed: 4,
                available: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let s = pool.stats();
    assert_eq!((s.in_use, s.live, s.free), (7, 7, 0));
    let c = pool.acquire(3).unwrap();
    pool.give_back(a);
    pool.give_back(c);
    let s = pool.stats();
    assert_eq!((s.in_use, s.live, s.free, s.created), (0, 10, 10, 10));
    // Reuse: no new creation.
    let d = pool.acquire(10).unwrap();
    assert_eq!(pool.stats().created, 10);
    pool.give_back(d);
    assert_eq!(pool.trim(0).unwrap(), 10);
    assert_eq!(b.live_pages(), 0);
}

#[test]
fn pool_background_thread_refills_and_trims() {
    let b = host(PAGE);
    let pool = PagePool::new(
        b.clone(),
        PoolConfig {
            low_watermark: 6,
            high_watermark: 8,
            ..PoolConfig::with_budget(PAGE, 32 * PAGE as u64)
        },
    )
    .unwrap();
    let wait_until = |f: &dyn Fn() -> bool| {
        for _ in 0..2000 {
            if f() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    };
    assert!(wait_until(&|| pool.stats().free >= 6), "refilled to low");
    let taken = pool.acquire(20).unwrap();
    assert!(wait_until(&|| pool.stats().free >= 6), "refilled again");
    pool.give_back(taken);
    assert!(
        wait_until(&|| pool.stats().free <= 8),
        "trimmed to high: {:?}",
        pool.stats()
    );
    let s = pool.stats();
    assert_eq!(s.live, b.live_pages());
    assert_eq!(s.live, s.free + s.in_use);
    drop(pool);
    assert_eq!(b.live_pages(), 0, "dropping the pool releases its pages");
}

#[test]
fn pool_create_all_prefills_the_budget() {
    let b = host(PAGE);
    let pool = PagePool::new(
        b.clone(),
        PoolConfig {
            create_all: true,
            background: false,
            ..PoolConfig::with_budget(PAGE, 12 * PAGE as u64)
        },
    )
    .unwrap();
    assert_eq!(pool.stats().free, 12);
    let p = pool.acquire(12).unwrap();
    assert_eq!(pool.stats().created_on_demand, 0);
    pool.give_back(p);
}

#[test]
fn injected_failures_leak_nothing() {
    let host = host(PAGE);
    let faulty = Arc::new(FaultyBackend::new(host.clone()));
    for n in 1..=5u64 {
        let pool = PagePool::new(
            faulty.clone(),
            PoolConfig {
                background: false,
                ..PoolConfig::with_budget(PAGE, 16 * PAGE as u64)
            },
        )
        .unwrap();
        let a = pool.acquire(2).unwrap();
        faulty.fail_nth(BackendOp::CreatePage, n);
        let err = pool.acquire(6).unwrap_err();
        assert!(matches!(
            err,
            Error::Injected {
                op: BackendOp::CreatePage
            }
        ));
        let s = pool.stats();
        assert_eq!(s.in_use, 2);
        assert_eq!(s.live, host.live_pages(), "pool and backend agree");
        // Pages created before the failure are kept free, not leaked.
        assert_eq!(s.free as u64, n - 1);
        // A failed release keeps the page in the pool.
        pool.give_back(a);
        faulty.fail_nth(BackendOp::ReleasePage, 1);
        assert!(pool.trim(0).is_err());
        assert_eq!(pool.stats().live, host.live_pages());
        pool.trim(0).unwrap();
        assert_eq!(host.live_pages(), 0);
    }
    // Map failures leave the range unmapped.
    let r = faulty.reserve(4 * PAGE).unwrap();
    let p = faulty.create_page(PAGE).unwrap();
    faulty.fail_nth(BackendOp::Map, 1);
    assert!(faulty.map(r.addr, &[&p]).is_err());
    assert_eq!(prot_at(r.addr).as_deref(), Some("r--p"));
    faulty.map(r.addr, &[&p]).unwrap();
    faulty.unmap(r.addr, PAGE).unwrap();
    faulty.release_page(p).map_err(|(_, e)| e).unwrap();
}

#[test]
fn async_copies_move_bytes() {
    let b = host(PAGE);
    let r = b.reserve(16 * PAGE).unwrap();
    let pages: Vec<_> = (0..16).map(|_| b.create_page(PAGE).unwrap()).collect();
    b.map(r.addr, &pages.iter().collect::<Vec<_>>()).unwrap();
    fill(r.addr, 16 * PAGE, 42);
    let h = b.alloc_host(16 * PAGE).unwrap();
    // SAFETY: both ranges are mapped for the whole copy and nobody else touches them.
    let c = unsafe {
        b.copy_async(
            CopyKind::DeviceToHost,
            &[CopyRegion {
                dst: h.addr(),
                src: r.addr,
                len: 16 * PAGE,
            }],
        )
    }
    .unwrap();
    c.wait().unwrap();
    assert!(c.poll().unwrap());
    assert!(check(h.addr(), 16 * PAGE, 42));
    b.unmap(r.addr, 16 * PAGE).unwrap();
    b.free_host(h).map_err(|(_, e)| e).unwrap();
}

/// Run by `a_stray_read_segfaults_only_without_the_zero_page` in a child process of its own
/// (re-executing this test binary): reads a reserved, never mapped byte, then exits 0 with the
/// byte's value as output; `KVVM_TEST_STRAY_READ` selects the mode ("zero" or "none").
#[test]
fn stray_read_helper() {
    let Ok(mode) = std::env::var("KVVM_TEST_STRAY_READ") else {
        return; // only meaningful in the child
    };
    let b = host_with(PAGE, mode == "zero");
    let r = b.reserve(2 * PAGE).unwrap();
    // SAFETY: deliberately reading reserved memory in a throwaway process: zeros with the zero
    // page, a SIGSEGV without it.
    let v = unsafe { std::ptr::read_volatile((r.addr + PAGE as u64 + 3) as usize as *const u8) };
    println!("stray read: {v}");
}

#[test]
fn a_stray_read_segfaults_only_without_the_zero_page() {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().unwrap();
    for (mode, segfault) in [("zero", false), ("none", true)] {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "stray_read_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KVVM_TEST_STRAY_READ", mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if segfault {
            assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{mode}: {text}");
        } else {
            assert!(out.status.success(), "{mode}: {:?} {text}", out.status);
            assert!(text.contains("stray read: 0"), "{mode}: {text}");
        }
    }
}
