//! `fork()` (issue 16, item 3): objects a child process inherits fail cleanly there, dropping them
//! in the child neither hangs nor touches the parent's pages, the child cannot reach the parent's
//! KV through inherited addresses, and the parent's data never changes because of a child.
//!
//! Each test forks for real. The child reports through its exit status (it calls `_exit`, so
//! that nothing of the test harness runs twice); the parent waits with a time limit and kills a
//! child that hangs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvvm::testing::{stamp_tokens, verify_tokens};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::Backend;
use kvvm::{CacheConfig, DType, Kv, KvCache, Layout, SlotId};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

fn cache(lookahead: usize) -> (KvCache, Arc<HostBackend>) {
    let page = os_page_size();
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: page,
            copy_threads: 2,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    let cache = KvCache::with_backend(
        CacheConfig::new(2, 2, 8)
            .with_dtype(DType::F32)
            .with_max_slots(4)
            .with_max_tokens(256)
            .with_layout(Layout::PerLayer)
            .with_budget_bytes((64 * page) as u64)
            .with_lookahead_steps(lookahead),
        host.clone() as Arc<dyn Backend>,
    )
    .expect("cache");
    (cache, host)
}

/// Waits for `child` for at most 20 s; kills it if it is still running then.
fn wait_child(child: Pid) -> Result<i32, String> {
    let t0 = Instant::now();
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)).map_err(|e| e.to_string())? {
            WaitStatus::Exited(_, code) => return Ok(code),
            WaitStatus::Signaled(_, sig, _) => return Err(format!("child killed by {sig:?}")),
            WaitStatus::StillAlive => {
                if t0.elapsed() > Duration::from_secs(20) {
                    let _ = kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err("child hung (killed after 20 s)".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return Err(format!("child: {other:?}")),
        }
    }
}

/// Runs `body` in a forked child, which exits with the code `body` returns.
fn in_child(body: impl FnOnce() -> i32) -> Result<i32, String> {
    // SAFETY: the child only uses kvvm objects (whose post-fork behaviour is under test), the
    // allocator (glibc's is fork-safe) and `_exit`; it never returns into the test harness.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(99);
            // SAFETY: `_exit` ends the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => wait_child(child),
    }
}

/// Whether `[addr, addr+len)` is mapped in this process (mincore fails with ENOMEM otherwise).
fn mapped(addr: u64, len: usize) -> bool {
    let page = os_page_size() as u64;
    let start = addr / page * page;
    let n = (addr + len as u64 - start).div_ceil(page) as usize;
    let mut vec = vec![0u8; n];
    // SAFETY: mincore only reads the page tables of this process and writes `n` bytes to `vec`.
    let r = unsafe {
        libc::mincore(
            start as usize as *mut libc::c_void,
            n * page as usize,
            vec.as_mut_ptr(),
        )
    };
    r == 0
}

fn setup(cache: &KvCache) -> SlotId {
    let a = cache.alloc_slot().expect("alloc");
    cache.ensure(a, 100).expect("ensure");
    // SAFETY: this thread owns the slot, which holds 100 tokens.
    unsafe { stamp_tokens(cache, a, 1, 0, 100).expect("stamp") };
    a
}

fn parent_still_fine(cache: &KvCache, a: SlotId) {
    // SAFETY: the slot holds 100 tokens and only this thread uses it.
    unsafe { verify_tokens(cache, a, 1, 100) }.expect("the parent's bytes after the child");
    // The parent goes on as if nothing happened: its pool's pages are its own.
    cache.ensure(a, 200).expect("ensure after fork");
    // SAFETY: as above, now 200 tokens.
    unsafe { stamp_tokens(cache, a, 1, 100, 200).expect("stamp") };
    let b = cache.alloc_slot().expect("alloc after fork");
    cache.ensure(b, 256).expect("ensure b");
    // SAFETY: this thread owns both slots.
    unsafe {
        stamp_tokens(cache, b, 2, 0, 256).expect("stamp b");
        verify_tokens(cache, a, 1, 200).expect("a after fork");
        verify_tokens(cache, b, 2, 256).expect("b after fork");
    }
}

#[test]
fn inherited_cache_fails_cleanly_in_the_child() {
    let (cache, _host) = cache(4);
    let a = setup(&cache);
    let row = cache.row(a, 0, 0, Kv::K).expect("row");
    let code = in_child(|| {
        // Every call that changes the cache is refused with an error (no panic, no hang).
        if cache.alloc_slot().is_ok() {
            return 1;
        }
        if cache.ensure(a, 120).is_ok() {
            return 2;
        }
        if cache.step(&[(a, 101)]).is_ok() {
            return 3;
        }
        if cache.shrink(a, 0).is_ok() {
            return 4;
        }
        if cache.free_slot(a).is_ok() {
            return 5;
        }
        if cache.reclaim_free_slots().is_ok() {
            return 6;
        }
        // The parent's KV is not reachable through the inherited address.
        if mapped(row.addr, row.len) {
            return 7;
        }
        0
    });
    assert_eq!(code, Ok(0), "child outcome");
    parent_still_fine(&cache, a);
}

#[test]
fn dropping_inherited_objects_in_the_child_leaves_the_parent_alone() {
    let (cache, host) = cache(4);
    let a = setup(&cache);
    // Free pages in the pool and a free slot holding pages: a child that released them would
    // punch holes in the memfd the parent shares with it.
    let f = cache.alloc_slot().expect("alloc");
    cache.ensure(f, 256).expect("ensure");
    cache.free_slot(f).expect("free");
    let code = in_child(|| {
        // SAFETY: the child has its own copy of the address space: taking the objects out of
        // it and dropping them there leaves the parent's objects as they are.
        let (c, h) = unsafe { (std::ptr::read(&cache), std::ptr::read(&host)) };
        drop(c);
        drop(h);
        0
    });
    assert_eq!(code, Ok(0), "child outcome");
    parent_still_fine(&cache, a);
    drop(cache);
    assert_eq!(host.live_pages(), 0, "pages leaked in the parent");
}

/// The child uses what it inherited as if it were its own while the parent goes on: the pages
/// that a free slot keeps mapped are the same memfd pages in both processes, so a child that
/// could allocate and write them would overwrite the request the parent put there.
#[test]
fn a_child_writing_its_inherited_cache_never_changes_the_parent() {
    let (cache, host) = cache(0);
    let a = setup(&cache);
    let f = cache.alloc_slot().expect("alloc");
    cache.ensure(f, 256).expect("ensure");
    cache
        .free_slot(f)
        .expect("free: the slot keeps its pages mapped");
    let (rx, tx) = nix::unistd::pipe().expect("pipe");
    // SAFETY: as in `in_child`.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            drop(tx);
            let mut b = [0u8; 1];
            // Wait until the parent has put its request into the free slot's pages.
            let _ = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&rx), &mut b);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Ok(s) = cache.alloc_slot_for(256) {
                    if cache.ensure(s, 256).is_ok() {
                        // SAFETY: the child believes it owns the slot (that is the hazard).
                        let _ = unsafe { stamp_tokens(&cache, s, 99, 0, 256) };
                        return 1;
                    }
                }
                0
            }))
            .unwrap_or(99);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(rx);
            let b = cache.alloc_slot_for(256).expect("alloc b");
            assert_eq!(b, f, "the parent reuses the slot whose pages are mapped");
            cache.ensure(b, 256).expect("ensure b");
            // SAFETY: this thread owns the slot, which holds 256 tokens.
            unsafe { stamp_tokens(&cache, b, 2, 0, 256).expect("stamp b") };
            nix::unistd::write(&tx, &[1]).expect("signal the child");
            let code = wait_child(child);
            // SAFETY: this thread owns both slots.
            unsafe {
                verify_tokens(&cache, a, 1, 100).expect("a after the child");
                verify_tokens(&cache, b, 2, 256).expect("b after the child");
            }
            assert_eq!(code, Ok(0), "the child could allocate and grow a slot");
        }
    }
    cache.free_slot(a).expect("free a");
    drop(cache);
    assert_eq!(host.live_pages(), 0, "pages leaked in the parent");
}
