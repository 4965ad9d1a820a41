//! `fork()` through the C ABI (issue 16, item 3): in the child, handles made in the parent fail
//! with `KVVM_STATUS_INVALID_ARGUMENT` (no panic, no hang) and freeing them only forgets them;
//! the parent's cache and bytes are unchanged.

use kvvm_capi::*;

mod support;
use support::{last_error, small_config as config};

#[test]
fn inherited_handles_fail_in_the_child_and_the_parent_keeps_its_bytes() {
    let c = config();
    let mut h = kvvm_cache::default();
    // SAFETY: valid locals.
    let st = unsafe { kvvm_cache_create(&c, &mut h) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    let mut slot = 0u32;
    // SAFETY: valid out-pointer.
    let st = unsafe { kvvm_cache_alloc_slot(h, &mut slot) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_cache_ensure(h, slot, 64), kvvm_status::KVVM_STATUS_OK);
    let row: Vec<u8> = (0..256u32).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: `row` holds one row (2 heads × 32 × f32 = 256 bytes).
    let st = unsafe {
        kvvm_cache_write_row(
            h,
            slot,
            5,
            1,
            kvvm_kv::KVVM_V as u32,
            row.as_ptr(),
            row.len(),
        )
    };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());

    // SAFETY: the child only calls the C ABI on inherited handles and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        if kvvm_cache_ensure(h, slot, 128) != kvvm_status::KVVM_STATUS_INVALID_ARGUMENT {
            code = 1;
        } else if !last_error().contains("parent process") {
            code = 2;
        }
        let mut s2 = 0u32;
        // SAFETY: valid out-pointer.
        let st = unsafe { kvvm_cache_alloc_slot(h, &mut s2) };
        if st != kvvm_status::KVVM_STATUS_INVALID_ARGUMENT {
            code = 3;
        }
        if kvvm_cache_shrink(h, slot, 0) != kvvm_status::KVVM_STATUS_INVALID_ARGUMENT {
            code = 4;
        }
        if kvvm_cache_free(h) != kvvm_status::KVVM_STATUS_OK {
            code = 5;
        }
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child status {status}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "child outcome");

    let mut back = vec![0u8; 256];
    // SAFETY: `back` holds one row.
    let st = unsafe {
        kvvm_cache_read_row(
            h,
            slot,
            5,
            1,
            kvvm_kv::KVVM_V as u32,
            back.as_mut_ptr(),
            back.len(),
        )
    };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    assert_eq!(back, row, "the parent's row changed");
    assert_eq!(kvvm_cache_ensure(h, slot, 200), kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_cache_free(h), kvvm_status::KVVM_STATUS_OK);
}

/// A child forked while another thread was inside a registry call used to inherit the registry
/// lock held (the thread that held it does not exist in the child), and its first kvvm call hung
/// forever. One thread looks a handle up in a loop (holding the lock about half the time) while
/// the main thread forks; every child must look up a handle and create and free a cache of its
/// own within the time limit.
#[test]
fn a_child_forked_during_a_registry_call_does_not_hang() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let c = config();
    let mut h = kvvm_cache::default();
    // SAFETY: valid locals.
    let st = unsafe { kvvm_cache_create(&c, &mut h) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    let mut slot = 0u32;
    // SAFETY: valid out-pointer.
    let st = unsafe { kvvm_cache_alloc_slot(h, &mut slot) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK);

    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: valid out-pointer.
                let st = unsafe { kvvm_cache_tokens(h, slot, &mut n) };
                assert_eq!(st, kvvm_status::KVVM_STATUS_OK);
            }
        })
    };

    let mut hung = 0;
    for _ in 0..100 {
        // SAFETY: the child calls the C ABI and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut n = 0u64;
            let mut code = 0;
            // SAFETY: valid out-pointer.
            let st = unsafe { kvvm_cache_tokens(h, slot, &mut n) };
            if st != kvvm_status::KVVM_STATUS_INVALID_ARGUMENT {
                code = 1;
            }
            let mut own = kvvm_cache::default();
            // SAFETY: valid locals.
            if unsafe { kvvm_cache_create(&c, &mut own) } != kvvm_status::KVVM_STATUS_OK
                || kvvm_cache_free(own) != kvvm_status::KVVM_STATUS_OK
            {
                code = 2;
            }
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let t0 = Instant::now();
        let mut status = 0;
        loop {
            // SAFETY: polls the child forked above.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                assert!(libc::WIFEXITED(status), "child status {status}");
                assert_eq!(libc::WEXITSTATUS(status), 0, "child outcome");
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                hung += 1;
                // SAFETY: kills and reaps the child forked above.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if hung > 0 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    assert_eq!(hung, 0, "a forked child hung in its first kvvm call");
    assert_eq!(kvvm_cache_free(h), kvvm_status::KVVM_STATUS_OK);
}
